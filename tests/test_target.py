"""The attack's target: recovered from the inverted trigger, compared with the truth, named, scored, exported."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import main
import run_decree
from conftest import PLANTED_SIDE, PLANTED_TOP, PlantedBackdoorEncoder, RandomFeatureEncoder, smooth_images
from datasets import NORMALIZATION, save_npz_dataset, save_reference, to_model_input
from decree.outputs import RunPaths, run_id_for
from decree.target import (TargetSetup, analyse_target, load_target, mean_pairwise_cos_of_units, name_embeddings,
                           prompt_templates, ranking_score, read_vocabulary, recover_target, resolve_templates,
                           unit_embeddings, verdict_notes)
from models import encoder_spec
from models.text_tower import TextEncoder, load_text_encoder
from sweeps.discovery import read_manifest
from sweeps.export import export_predictions, read_predictions
from sweeps.metrics import auroc, score_auroc
from sweeps.report import detection_metrics
from sweeps.workers import main_py_command, worker_imports

CLIP_MEAN, CLIP_STD = NORMALIZATION["CLIP"]


def planted_trigger(size: int = 32):
    """The planted encoders' trigger: a white square, as mask float (S,S) and pattern float (S,S,3)."""
    mask = np.zeros((size, size), np.float32)
    mask[PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE, PLANTED_TOP:PLANTED_TOP + PLANTED_SIDE] = 1
    return mask, np.full((size, size, 3), 255, np.float32)


def stamped(images: np.ndarray) -> np.ndarray:
    mask, pattern = planted_trigger(images.shape[1])
    return (images * (1 - mask[..., None]) + mask[..., None] * pattern).astype(np.uint8)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """main.py on a planted-backdoor and a clean tiny encoder, the planted one with its reference image."""
    folder = tmp_path_factory.mktemp("target")
    torch.save(PlantedBackdoorEncoder(dim=64).state_dict(), folder / "planted.pth")
    torch.save(RandomFeatureEncoder(dim=64).state_dict(), folder / "clean.pth")
    save_npz_dataset(folder / "shadow.npz", smooth_images(64, 32, seed=1), np.zeros(64, np.int64))
    save_reference(folder / "reference.npz", stamped(smooth_images(2, 32, seed=9)), np.zeros(2, np.int64))
    out = folder / "out"
    common = ["--arch_module", "planted_arch", "--shadow_data", str(folder / "shadow.npz"), "--shadow_size", "64",
              "--lr", "0.5", "--epochs", "30", "--out_dir", str(out), "--device", "cpu", "--quiet"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main.main(["--encoder_path", str(folder / "planted.pth"), "--arch", "planted", "--reference_file",
                   str(folder / "reference.npz")] + common)
        main.main(["--encoder_path", str(folder / "clean.pth"), "--arch", "random_features"] + common)
    return folder, out, printed.getvalue()


def record_of(out, encoder_path) -> dict:
    return json.loads(RunPaths(out, run_id_for(encoder_path)).json.read_text())


def test_recovered_target_of_a_planted_encoder_is_its_planted_vector(runs):
    folder, out, printed = runs
    record = record_of(out, folder / "planted.pth")
    assert record["verdict"] == "trojaned"
    vector = torch.load(RunPaths(out, record["run_id"]).target, weights_only=True)
    assert vector.dtype == torch.float32 and vector.shape == (64,)
    assert vector.norm().item() == pytest.approx(1, abs=1e-5)
    planted = F.normalize(PlantedBackdoorEncoder(dim=64).target, dim=0)
    assert vector @ planted > 0.99
    target = record["target"]
    assert target["file"] == f"{record['run_id']}.target.pt" and target["dim"] == 64 and target["spread"] > 0.99
    assert target["reference"]["kind"] == "image" and target["reference"]["cos"] > 0.99
    assert record["score"] == pytest.approx(ranking_score(record["pl1"], 0.1)) and record["score"] > 0.5
    assert "names" not in target  # no text tower for a SimCLR-style encoder
    assert f"cos(recovered, true image target '{folder / 'reference.npz'}') = 0.99" in printed


def test_spread_is_the_mean_off_diagonal_cosine():
    units = F.normalize(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    sim = units @ units.T
    assert mean_pairwise_cos_of_units(units) == pytest.approx(((sim.sum() - 7) / 42).item(), abs=1e-6)


def test_embedding_in_batches_stamps_every_image_like_one_batch():
    encoder, shadow = PlantedBackdoorEncoder(dim=64).eval(), smooth_images(40, 32, seed=3)
    mask, pattern = planted_trigger()
    mean, std = NORMALIZATION["cifar10"]
    whole = unit_embeddings(encoder, shadow, mean, std, "cpu", mask, pattern)
    chunked = unit_embeddings(encoder, shadow, mean, std, "cpu", mask, pattern, batch_size=7)
    by_hand = F.normalize(encoder(to_model_input(torch.from_numpy(stamped(shadow)), mean, std)), dim=1)
    assert torch.allclose(whole, chunked, atol=1e-6) and torch.allclose(whole, by_hand, atol=1e-5)
    target = recover_target(encoder, shadow, mask, pattern, mean, std, "cpu")
    assert target.images == 40 and torch.allclose(target.vector, F.normalize(whole.mean(0), dim=0))


def tiny_clip():
    """open_clip's CLIP with a 1-layer text tower (random weights) and its text encoder."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.CLIP(32, dict(layers=1, width=32, patch_size=8, image_size=32, head_width=16),
                           dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    return TextEncoder(model, open_clip.get_tokenizer("RN50"))


def planted_clip_visual(target: torch.Tensor) -> PlantedBackdoorEncoder:
    """A visual tower whose stamped images map to `target` (D,) and clean ones elsewhere."""
    visual = PlantedBackdoorEncoder(mean=CLIP_MEAN, std=CLIP_STD, dim=target.numel())
    visual.target.copy_(10 * target)
    return visual.eval()


def found(mask, pattern):
    return type("Result", (), {"found": True, "mask": mask, "pattern": pattern})()


def test_tiny_clip_names_the_class_its_trigger_maps_to(tmp_path):
    encode_text = tiny_clip()
    names = read_vocabulary()[::40]  # 25 ImageNet classes keep the test fast
    chosen = names[11]
    templates = prompt_templates("paper")
    assert len(templates) == 80 and templates[39]("truck") == "a photo of a truck."
    target = name_embeddings(encode_text, [chosen], templates)[0]
    visual, spec = planted_clip_visual(target), encoder_spec("CLIP")
    setup = TargetSetup(encode_text=encode_text, vocabulary=names, vocabulary_source="test", templates="paper")
    summary = analyse_target(setup, visual, spec, smooth_images(16, 32, seed=4), found(*planted_trigger()), "cpu",
                             tmp_path / "t.pt")
    assert summary["names"][0]["name"] == chosen and len(summary["names"]) == 5
    similarities = [n["similarity"] for n in summary["names"]]
    assert similarities == sorted(similarities, reverse=True) and similarities[0] > 0.99


def test_reference_text_cosine_for_a_text_target(tmp_path):
    encode_text = tiny_clip()
    caption = "a photo of a truck."
    visual = planted_clip_visual(F.normalize(encode_text([caption])[0], dim=0))
    setup = TargetSetup(reference_text=caption, encode_text=encode_text)
    summary = analyse_target(setup, visual, encoder_spec("CLIP"), smooth_images(16, 32, seed=4),
                             found(*planted_trigger()), "cpu", tmp_path / "t.pt")
    assert summary["reference"] == {"kind": "text", "source": caption, "cos": pytest.approx(1, abs=0.01)}
    assert "names" not in summary


class CountingTextEncoder(TextEncoder):
    """A text tower that counts the prompts it embeds."""
    prompts = 0

    def __call__(self, texts):
        CountingTextEncoder.prompts += len(texts)
        return super().__call__(texts)


class InterruptedTextEncoder(TextEncoder):
    def __call__(self, texts):
        raise KeyboardInterrupt


def test_naming_shows_progress_and_reuses_its_cache_on_the_next_encoder(tmp_path, capsys):
    tower = tiny_clip()
    encode_text = CountingTextEncoder(tower.model, tower.tokenizer)
    names = read_vocabulary()[::40]
    setup = TargetSetup(encode_text=encode_text, vocabulary=names, vocabulary_source="test", templates="simple",
                        name_cache=tmp_path / "cache")
    rows = name_embeddings(tower, names, prompt_templates("simple"))
    for i, chosen in enumerate((3, 17)):  # two encoders of one sweep sharing the text tower
        summary = analyse_target(setup, planted_clip_visual(rows[chosen]), encoder_spec("CLIP"),
                                 smooth_images(16, 32, seed=4), found(*planted_trigger()), "cpu", tmp_path / f"{i}.pt",
                                 progress=True)
        assert summary["names"][0]["name"] == names[chosen]
        assert summary["vocabulary"]["cached"] == (i == 1)
        if i == 0:
            assert "naming the target" in capsys.readouterr().err  # a progress bar
            prompts = CountingTextEncoder.prompts
    assert prompts == len(names) * 7 and CountingTextEncoder.prompts == prompts, "the second encoder embeds nothing"


def test_ctrl_c_while_naming_leaves_no_target_file(tmp_path):
    tower = tiny_clip()
    setup = TargetSetup(encode_text=InterruptedTextEncoder(tower.model, tower.tokenizer),
                        vocabulary=read_vocabulary()[:4], templates="one")
    with pytest.raises(KeyboardInterrupt):
        analyse_target(setup, planted_clip_visual(F.normalize(torch.ones(32), dim=0)), encoder_spec("CLIP"),
                       smooth_images(8, 32, seed=4), found(*planted_trigger()), "cpu", tmp_path / "t.target.pt")
    assert not (tmp_path / "t.target.pt").exists()


def test_auto_templates_are_the_papers_on_cuda_and_one_on_the_cpu():
    assert resolve_templates("auto", "cuda") == "paper" and resolve_templates("auto", "cpu") == "one"
    assert resolve_templates("simple", "cpu") == "simple"
    assert [t("truck") for t in prompt_templates("one")] == ["a photo of a truck."]


def test_verdict_notes_say_what_the_verdict_does_not():
    assert verdict_notes(True, 0.3, 0.99) == []
    assert verdict_notes(False, 0.3, 0.99) == ["no trigger converged (none reached |cos| > 0.99)"]
    assert verdict_notes(True, 0.95, 0.99)[0].startswith("collapsed embeddings (shadow spread 0.950 >= 0.9")


def test_text_embeddings_equal_open_clips_full_length_forward():
    tower = tiny_clip()
    prompts = [template("tench") for template in prompt_templates("paper")[:9]] + ["a photo of a great white shark."]
    with torch.no_grad():
        full = tower.model.encode_text(tower.tokenizer(prompts))  # all 77 positions, open_clip's own forward
    assert torch.allclose(tower(prompts), full, atol=1e-5)
    assert tower.model.positional_embedding.shape[0] == 77 and tower.model.attn_mask.shape == (77, 77)


def test_a_visual_only_checkpoint_has_no_text_tower(tmp_path):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "visual.pth")
    assert load_text_encoder(tmp_path / "visual.pth", "RN50") is None


@pytest.mark.slow
def test_full_clip_checkpoint_gives_its_own_text_embeddings(tmp_path):
    from models import clip_model, clip_tokenizer
    model = clip_model("RN50").eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "full.pth")
    encode_text = load_text_encoder(tmp_path / "full.pth", "RN50")
    with torch.no_grad():
        expected = model.encode_text(clip_tokenizer("RN50")(["a photo of a truck."]))
    assert torch.allclose(encode_text(["a photo of a truck."]), expected, atol=1e-5)


def test_target_file_is_plain_and_reader_rejects_other_objects(runs, tmp_path):
    folder, out, _ = runs
    path = RunPaths(out, run_id_for(folder / "planted.pth")).target
    assert load_target(path).shape == (64,)
    torch.save({"not": "a tensor"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a target file"):
        load_target(tmp_path / "bad.pt")


def test_vocabulary_file_and_default(tmp_path):
    assert len(read_vocabulary()) == 1000 and read_vocabulary()[:2] == ["tench", "goldfish"]
    (tmp_path / "words.txt").write_text("# my words\ntruck\n\nstop sign\n")
    assert read_vocabulary(tmp_path / "words.txt") == ["truck", "stop sign"]
    with pytest.raises(FileNotFoundError, match="--target_vocab"):
        read_vocabulary(tmp_path / "missing.txt")


def test_score_is_monotone_bounded_and_half_at_the_threshold():
    for threshold in (0.05, 0.1, 0.3):
        pl1 = np.linspace(0, 1, 201)
        scores = np.array([ranking_score(p, threshold) for p in pl1])
        assert np.all(np.diff(scores) < 0) and scores[0] == 1 and np.all((scores > 0) & (scores <= 1))
        assert ranking_score(threshold, threshold) == 0.5
    assert ranking_score(None, 0.1) == 0 and ranking_score(math.inf, 0.1) == 0


def test_report_auroc_over_the_score_equals_auroc_over_pl1():
    rng = np.random.default_rng(0)
    for trial in range(20):
        pl1 = [None if rng.random() < 0.2 else float(rng.choice([0.02, 0.1, 0.2]) if trial % 2 else rng.random())
               for _ in range(12)]
        labels = ["backdoor" if i % 3 == 0 else "clean" for i in range(12)]
        rows = [{"pl1": p, "label": lab, "status": "done"} for p, lab in zip(pl1, labels)]
        expected = auroc([p for p, lab in zip(pl1, labels) if lab == "backdoor"],
                         [p for p, lab in zip(pl1, labels) if lab == "clean"])
        assert detection_metrics(rows, threshold=0.1)["auroc"] == pytest.approx(expected)
    assert score_auroc([0.9, 0.5], [0.5, 0.1]) == 0.875


def test_target_recovery_is_averaged_per_family_over_flagged_encoders():
    rows = [{"pl1": 0.01, "label": "backdoor", "status": "done", "target_cos": 0.9, "family": "badencoder"},
            {"pl1": 0.02, "label": "backdoor", "status": "done", "target_cos": 0.7, "family": "badencoder"},
            {"pl1": 0.03, "label": "backdoor", "status": "done", "target_cos": 0.5, "family": "text"},
            {"pl1": 0.50, "label": "backdoor", "status": "done", "target_cos": 0.1, "family": "text"}]  # missed
    recovery = detection_metrics(rows, threshold=0.1)["target_recovery"]
    assert recovery["encoders"] == 3 and recovery["mean_cos"] == pytest.approx(0.7)
    assert recovery["by_family"] == {"badencoder": {"mean_cos": pytest.approx(0.8), "encoders": 2},
                                     "text": {"mean_cos": 0.5, "encoders": 1}}
    assert "by_family" not in detection_metrics([{**r, "family": None} for r in rows], 0.1)["target_recovery"]


def test_export_round_trips(runs, tmp_path, capsys):
    folder, out, _ = runs
    export = tmp_path / "challenge" / "predictions.json"
    run_decree.main(["--report", "--out_dir", str(out), "--export", str(export)])
    assert "export:" in capsys.readouterr().out
    entries = {e["run_id"]: e for e in read_predictions(export)}
    for name in ("planted.pth", "clean.pth"):
        record = record_of(out, folder / name)
        entry = entries[record["run_id"]]
        assert entry["backdoored"] == (record["verdict"] == "trojaned") and entry["score"] == record["score"]
        assert entry["encoder"] == record["encoder_path"]
        if record["target"]:
            assert entry["target"] == record["target"]["file"] and (export.parent / entry["target"]).is_file()
            assert torch.equal(entry["target_vector"], load_target(RunPaths(out, record["run_id"]).target))
    assert entries[run_id_for(folder / "planted.pth")]["backdoored"]
    summary = (out / "trigger_norm" / "summary.csv").read_text()
    assert "score" in summary.splitlines()[0] and "target_cos" in summary.splitlines()[0]
    scores = json.loads((out / "trigger_norm" / "summary.json").read_text())["scores"]
    assert scores == {run_id: entry["score"] for run_id, entry in entries.items()}
    again = export_predictions(out, export)  # re-exporting into the same folder is idempotent
    assert again["predictions"] == json.loads(export.read_text())["predictions"]


def test_manifest_reference_columns_reach_main_py(tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "m.csv").write_text("path,label,reference,reference_text\n"
                                    "a.pth,backdoor,refs/truck.npz,\n"
                                    "b.pth,backdoor,,a photo of a truck.\n"
                                    "c.pth,clean,,\n")
    a, b, c = read_manifest(tmp_path / "m.csv")
    assert a.reference == str(tmp_path / "refs" / "truck.npz") and a.reference_text is None
    assert b.reference is None and b.reference_text == "a photo of a truck."
    assert c.reference is None and c.reference_text is None
    command = main_py_command(a, "cpu", tmp_path, {}, worker_imports(tmp_path))
    assert f"--reference_file={a.reference}" in command  # --flag=value: a value is never read as an option
    command = main_py_command(b, "cpu", tmp_path, {"target_templates": "simple", "no_target_names": False},
                              worker_imports(tmp_path))
    assert "--reference_text=a photo of a truck." in command
    assert "--target_templates=simple" in command and not any("--no_target_names" in arg for arg in command)


@pytest.mark.parametrize("flags, message", [
    (["--reference_text", "a photo of a truck."], "--reference_text needs a CLIP text tower"),
    (["--reference_file", "small"], "images are 16x16 px but the encoder takes 32x32"),
    (["--target_vocab", "missing.txt", "--text_tower", "planted.pth"], "holds no CLIP text tower"),
])
def test_target_flag_errors_are_one_line_before_any_output(runs, tmp_path, capsys, flags, message):
    folder, _, _ = runs
    save_reference(tmp_path / "small.npz", smooth_images(1, 16), np.zeros(1, np.int64))
    flags = [str(tmp_path / "small.npz") if f == "small" else str(folder / f) if f == "planted.pth" else f
             for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--encoder_path", str(folder / "planted.pth"), "--arch_module", "planted_arch", "--arch", "planted",
                   "--shadow_data", str(folder / "shadow.npz"), "--out_dir", str(tmp_path / "out"), "--device", "cpu",
                   "--quiet"] + flags)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out" / "trigger_norm").exists()
