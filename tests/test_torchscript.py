"""models/torchscript.py: TorchScript archives read bit-exactly as torch.jit.load would, with nothing run."""
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import hostile
from models.checkpoint import CheckpointError, UnsafeCheckpointError, read_checkpoint
from models.torchscript import read_torchscript_state_dict

REPO = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.half_linear = nn.Linear(3, 4).half()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.register_buffer("counts", torch.arange(5, dtype=torch.int64))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.plain = torch.zeros(3)  # a tensor attribute, neither parameter nor buffer

    def forward(self, x):
        return self.bn(self.conv(x)) + self.plain.sum() + self.scratch.sum()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.transposed = nn.Parameter(torch.randn(4, 6).t())  # non-contiguous strides
        self.head = nn.Sequential(nn.Linear(6, 2), nn.ReLU())

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def save_jit(module, path, trace_input=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(module, trace_input) if trace_input is not None else torch.jit.script(module)
        torch.jit.save(scripted, str(path))
        return torch.jit.load(str(path)).state_dict()


def assert_same_state(ours: dict, reference: dict) -> None:
    assert list(ours) == list(reference)
    for name, ref in reference.items():
        got = ours[name]
        assert (got.dtype, got.shape, got.stride()) == (ref.dtype, ref.shape, ref.stride()), name
        assert torch.equal(raw_bytes(got), raw_bytes(ref)), name


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as uint8 bytes: equality of these is bit-exactness (NaN payloads, -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_honest_archive_gives_jit_state_dict_bit_for_bit(how, tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    net.blocks[1].bn.running_var.uniform_(0.5, 2)
    reference = save_jit(net, tmp_path / "net.pt", torch.randn(2, 2, 8, 8) if how == "trace" else None)
    ours = read_torchscript_state_dict(tmp_path / "net.pt")
    assert_same_state(ours, reference)
    assert ours["blocks.0.half_linear.weight"].dtype == torch.float16 and "blocks.0.plain" not in ours
    assert "blocks.1.scratch" in ours  # TorchScript keeps non-persistent buffers in its state dict


def test_openai_style_clip_archive_reads_and_loads(tmp_path):
    """A tiny traced open_clip CLIP (visual + text tower) in fp16 with OpenAI's extra keys, as OpenAI's .pt."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from attacks.jobs import OPENAI_EXTRA_KEYS
    from models.checkpoint import adapt_state_dict, load_into

    def tiny_clip():
        torch.manual_seed(0)
        return CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                           image_size=32),
                    text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
                    quick_gelu=True).eval()
    model = tiny_clip()
    for name, value in zip(OPENAI_EXTRA_KEYS, (32, 8, 50)):  # OpenAI's archives carry these as tensors
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.rand(2, 3, 32, 32), torch.randint(0, 50, (2, 8))), check_trace=False)
    traced.half()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    reference = torch.jit.load(str(path)).state_dict()

    sd = read_checkpoint(path)
    assert_same_state(sd, reference)
    assert sd["visual.conv1.weight"].dtype == torch.float16 and "transformer.resblocks.0.attn.in_proj_weight" in sd
    fresh = tiny_clip()
    # open_clip's attn_mask is a non-persistent buffer: TorchScript keeps it, a fresh model's state dict does not
    weights = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS + ("attn_mask",)}
    load_into(fresh, weights, path, tried="tiny CLIP")
    assert torch.equal(fresh.visual.conv1.weight, sd["visual.conv1.weight"].float())
    visual = tiny_clip().visual
    load_into(visual, adapt_state_dict(sd, "clip"), path, tried="tiny CLIP visual")


def test_trusted_archive_goes_through_torch_jit_load(tmp_path):
    reference = save_jit(Net(), tmp_path / "net.pt")
    assert_same_state(read_checkpoint(tmp_path / "net.pt", trust_checkpoint=True), reference)


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    root = tmp_path_factory.mktemp("payloads")
    return root, hostile.scripted_payloads(root, root / "marker")


def test_payloads_are_real_under_torch_jit_load(payloads):
    """torch.jit.load runs the archives' __setstate__: the marker appears, and the loop never returns."""
    root, archives = payloads
    code = (f"import sys, torch; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
            f"torch.jit.load({str(archives['__setstate__ writes a file'])!r})\n"
            "print('ran', flush=True)\n"
            f"torch.jit.load({str(archives['__setstate__ loops forever'])!r})\n"
            "print('returned', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ran"
        assert (root / "marker").exists()
        time.sleep(2)
        assert proc.poll() is None, "the looping __setstate__ returned"
    finally:
        proc.kill()
        proc.wait()
        (root / "marker").unlink(missing_ok=True)


@pytest.mark.parametrize("name", ["__setstate__ writes a file", "submodule __setstate__ writes a file",
                                  "__setstate__ loops forever"])
def test_code_carrying_archive_is_refused_without_running_it(name, payloads):
    root, archives = payloads
    started = time.time()
    with pytest.raises(UnsafeCheckpointError, match="__setstate__ code.*--trust_checkpoint") as err:
        read_checkpoint(archives[name])
    assert time.time() - started < 5 and not (root / "marker").exists()
    assert "\n" not in str(err.value) and str(archives[name]) in str(err.value)


def test_forward_payload_is_loaded_as_weights_and_never_called(payloads):
    root, archives = payloads
    sd = read_checkpoint(archives["forward writes a file"])
    assert list(sd) == ["linear.weight", "linear.bias"] and not (root / "marker").exists()


def test_hand_assembled_archive_reads(tmp_path):
    """The assembler behind the hostile archives writes what torch writes: the honest one reads."""
    sd = read_torchscript_state_dict(hostile.write_archive(tmp_path / "honest.pt"))
    assert sd["w"].tolist() == [1.5, -2.0] and sd["b"].tolist() == [0.25, 4.0, 8.0]


HOSTILE_NEEDS_CODE = {"GLOBAL+REDUCE open", "STACK_GLOBAL protocol 4", "INST opcode", "OBJ opcode",
                      "payload inside module state", "os.system", "torch.from_file", "unknown storage type",
                      "state is a tuple", "class with __setstate__ code"}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    return root, hostile.hostile_archives(root, root / "marker")


def test_crafted_archives_are_refused_in_one_line(crafted):
    """Every hostile or malformed archive: CheckpointError naming the file; --trust_checkpoint named only
    for well-formed pickles that need code; nothing runs; each answer comes at once."""
    root, archives = crafted
    assert len(archives) >= 35
    for name, path in archives.items():
        started = time.time()
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        message = str(err.value)
        assert message.startswith(str(path)) and "\n" not in message, name
        assert ("--trust_checkpoint" in message) == (name in HOSTILE_NEEDS_CODE), (name, message)
        assert isinstance(err.value, UnsafeCheckpointError) == (name in HOSTILE_NEEDS_CODE), name
        assert time.time() - started < 10, name
    assert not (root / "marker").exists()
