"""Detection benchmark: a population of clean and trojaned encoders, DECREE on all of it, a per-family report.

Three stages, each cached on disk and keyed by its settings (a hash of the fields that shape it), so a rerun
only does what changed:

    population  P clean SimCLR parents (seeds seed..seed+P-1); per parent a clean fine-tuned control (the
                BadEncoder objective without a trigger) and one attacked encoder per family (attacks.families):
                fine-tuned from the parent, or, for a data-poisoning family, pre-trained from scratch like the
                parent (same seed) on its poisoned data; for each attacked encoder whether the attack took
                (mean cosine of stamped test images to the target embedding, their mean pairwise cosine, ASR of
                a downstream probe). Writes manifest.csv (path, usage_info, arch, label, family) and
                population.json.
    detect      DECREE on every manifest encoder through the sweep (sweeps.pool: one main.py per encoder,
                finished runs skipped), into detect/<key>/, plus the sweep's own report there.
    report      per family: n, attack success, PL1 mean/min/max, TPR at the threshold, AUROC against every
                clean encoder (parents + controls), clean FPR; report/bench.md, bench.json, roc.png,
                pl1_by_family.png, gallery.png.

Layout under out_dir (output/bench): data/<key>/*.npz, encoders/<parent>_<role>_<key>/model_<E>.pth (+
config.json, success_<key>.json), manifest.csv, population.json, detect/<key>/, report/.
"""
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from attacks.badencoder import BadEncoderConfig, train_badencoder
from attacks.checkpoints import save_encoder
from attacks.drupe import train_drupe
from attacks.families import (FAMILIES, FAMILY_NOTES, POISONING_FAMILIES, THREAT_MODELS, make_trigger, threat_model,
                              warp_displacement, warp_grid)
from attacks.poisoning import CTRL_RATE, poison_target_class
from attacks.simclr import PretrainConfig, pretrain_simclr
from attacks.training import unit_embeddings
from common import io as atomic
from common.device import describe_machine, resolve_device
from common.provenance import versions
from common.threads import threads_per_worker, usable_cores
from datasets import DataError, NORMALIZATION, load_npz, save_npz_dataset
from datasets.photos import load_photos, photo_patches
from decree.inversion import mean_pairwise_cos
from decree.settings import InversionConfig
from decree.warp_test import WARP_THRESHOLD
from experiments.real_parent import USAGE_INFO as REAL_USAGE_INFO
from experiments.real_parent import RealParentUnavailable, verified_weights
from models import SimCLR, load_encoder, mobilenet_arch
from sweeps.discovery import read_manifest
from sweeps.pool import run_sweep
from sweeps.figures import save_figure
from sweeps.metrics import BACKDOOR, CLEAN, auroc, by_truth, flag_rates, rates, roc_curve, row_truth, score_auroc
from sweeps.report import collect_rows, write_report
from sweeps.workers import worker_devices
from validate.downstream import (DownstreamConfig, DownstreamData, attack_scores, embed_downstream, predict,
                                 train_classifier)

CLEAN_FAMILIES = ("clean-parent", "clean-control")
STAGES = ("population", "detect", "report")


@dataclass(frozen=True)
class BenchConfig:
    """The benchmark's settings; defaults: the toy population on scikit-image photo patches (2 CPU cores)."""
    usage_info: str = "cifar10"
    arch: str = "resnet18_w16"               # ResNet18-CIFAR at 1/4 width, as the demo
    pretraining_data: str | None = None      # npz x uint8 (N,32,32,3); None: photo patches
    pretrain_images: int | None = 4000       # photo patches (None with pretraining_data: all of it)
    pretrain_epochs: int = 12
    pretrain_batch: int = 128
    parents: int = 3
    families: tuple = FAMILIES
    attack_images: int = 1000                # BadEncoder's shadow set: the first images of the pre-training set
    attack_epochs: int = 12                  # with 1000 images: the population in 90 min on 2 AVX2 cores
    attack_batch: int = 64
    attack_lr: float = 0.01
    drupe_epochs: int = 40                   # DRUPE's schedule scaled to these (attacks.drupe.scale_phases)
    references: int = 3                      # target-class reference images (DRUPE uses all; others the first)
    downstream_train: str | None = None      # labelled npz; None: photo patches labelled by their photo
    downstream_test: str | None = None
    target_label: int = 1                    # photo patches: chelsea (the cat); paper scale: STL10 truck (9)
    probe_train_per_class: int = 100         # photo patches per photo for the probe
    probe_test_per_class: int = 50
    probe_epochs: int = 50                   # cheap: the papers' 200-500 only move ASR by a few points
    took_asr: float = 50.0                   # an attack took when its probe's ASR (%) reaches this
    drupe_spread: float = 0.6                # and, for DRUPE, its stamped embeddings' pairwise cosine is below
    shadow_data: str | None = None           # DECREE's shadow set; None: held-out photo patches
    shadow_images: int | None = 500          # None with shadow_data: the paper's default selection
    decree_lr: float = InversionConfig.lr
    decree_epochs: int = InversionConfig.max_epochs
    decree_seed: int = InversionConfig.seed
    pl1_threshold: float = 0.1
    warp_test: bool = True                   # the warp test beside DECREE (decree/warp_test.py, its defaults)
    workers: int = 2                         # parallel DECREE runs
    seed: int = 0
    real_parent: bool = True                 # add the real MobileNetV2 parent and its children (if installed)
    real_parent_size: int = 64               # their input size: what fine-tuning an ImageNet net costs on a CPU
    real_parent_families: tuple = ("patch-white", "blend", "drupe")
    real_parent_images: int = 128            # BadEncoder's shadow set for them
    real_parent_lr: float = 1e-3             # BadEncoder's own rate: the toy's 0.01 pulls a trained net apart
    real_parent_shadow_images: int = 128     # DECREE's shadow set for them (64 px ImageNet passes cost more)


QUICK = BenchConfig(arch="resnet18_w4", pretrain_images=256, pretrain_epochs=1, parents=1,
                    families=FAMILIES, attack_images=128, attack_epochs=1, drupe_epochs=5, real_parent_images=64,
                    real_parent_shadow_images=32,
                    probe_train_per_class=16, probe_test_per_class=8, probe_epochs=3, shadow_images=64,
                    decree_epochs=3, workers=2)
# BadEncoder's CIFAR10 recipe: 1000 epochs of SimCLR, 200 of BadEncoder on 20% of the training set, STL10
# downstream with the truck as target, DECREE's default shadow set (10% of each class of CIFAR10 test)
PAPER = BenchConfig(arch="resnet18", pretraining_data="data/cifar10/train.npz", pretrain_images=None,
                    pretrain_epochs=1000, pretrain_batch=512, attack_images=10000, attack_epochs=200, drupe_epochs=200,
                    attack_batch=256, attack_lr=1e-3, downstream_train="data/stl10/train.npz",
                    downstream_test="data/stl10/test.npz", target_label=9, probe_epochs=100,
                    shadow_data="data/cifar10/test.npz", shadow_images=None, workers=4, real_parent_size=224,
                    real_parent_images=10000)
SCALES = {"toy": BenchConfig(), "quick": QUICK, "paper": PAPER}


def settings_key(settings: dict) -> str:
    """A short stable hash of a settings dict: the cache key of what those settings produce."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _subset(cfg: BenchConfig, *names: str) -> dict:
    return {name: getattr(cfg, name) for name in names}


@dataclass(frozen=True)
class Lineage:
    """Encoders that share an architecture, input size and data: the parents we pre-train ('toy'), or the real
    third-party parent ('mnet') with its children."""
    name: str
    arch: str
    usage_info: str
    size: int
    real: bool = False


def toy_lineage(cfg: BenchConfig) -> Lineage:
    return Lineage("toy", cfg.arch, cfg.usage_info, 32)


def real_lineage(cfg: BenchConfig) -> Lineage:
    return Lineage("mnet", mobilenet_arch(cfg.real_parent_size), REAL_USAGE_INFO, cfg.real_parent_size, real=True)


# ---- data ---------------------------------------------------------------------------------------------------

def data_settings(cfg: BenchConfig, size: int = 32) -> dict:
    settings = _subset(cfg, "pretraining_data", "pretrain_images", "references", "downstream_train",
                       "downstream_test", "target_label", "probe_train_per_class", "probe_test_per_class",
                       "shadow_data", "shadow_images", "seed")
    return settings if size == 32 else {**settings, "size": size}


def labelled_photo_patches(per_class: int, seed: int, photos, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """per_class patches of each bundled photo, labelled by the photo: uint8 (N,size,size,3), int64 (N,)."""
    x = np.concatenate([photo_patches(per_class, size, seed=seed + i, photos=[p]) for i, p in enumerate(photos)])
    return x, np.repeat(np.arange(len(photos)), per_class)


def prepare_data(cfg: BenchConfig, root: Path, size: int = 32) -> dict:
    """Write (or reuse) the npz files of the population at `size` px (photo patches: the same crops at every
    size; given npz files must already have that size); returns their paths."""
    folder = root / "data" / settings_key(data_settings(cfg, size))
    paths = {name: folder / f"{name}.npz" for name in ("pretrain", "shadow", "reference", "probe_train", "probe_test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    photos = load_photos()
    if cfg.pretraining_data:  # labels, where the file has them, are only read by data-poisoning families
        pretrain, pretrain_y = load_npz(cfg.pretraining_data)
        pretrain = pretrain[:cfg.pretrain_images]
        pretrain_y = None if pretrain_y is None else pretrain_y[:cfg.pretrain_images]
    else:
        pretrain, pretrain_y = photo_patches(cfg.pretrain_images, size, seed=cfg.seed, return_labels=True)
    if cfg.downstream_train:
        if not cfg.downstream_test:
            raise ValueError("--downstream_train needs --downstream_test (the probe's labelled test images)")
        train_x, train_y = load_npz(cfg.downstream_train, require_labels=True)
        test_x, test_y = load_npz(cfg.downstream_test, require_labels=True)
    else:
        train_x, train_y = labelled_photo_patches(cfg.probe_train_per_class, cfg.seed + 100, photos, size)
        test_x, test_y = labelled_photo_patches(cfg.probe_test_per_class, cfg.seed + 200, photos, size)
    if not (train_y == cfg.target_label).any():
        raise DataError(f"the probe's training data has no image of the target class {cfg.target_label}")
    if cfg.downstream_train:  # the papers' reference inputs: images of the target class of the downstream set
        references = train_x[train_y == cfg.target_label][:cfg.references]
    else:  # held-out patches of the target photo, not in the probe's data
        references = photo_patches(cfg.references, size, seed=cfg.seed + 11, photos=[photos[cfg.target_label]])
    if cfg.shadow_data:
        shadow, shadow_y = load_npz(cfg.shadow_data)
    else:
        shadow, shadow_y = photo_patches(cfg.shadow_images, size, seed=cfg.seed + 7), None
    for name, (x, y) in {"pretrain": (pretrain, pretrain_y), "shadow": (shadow, shadow_y),
                         "reference": (references, np.full(len(references), cfg.target_label)),
                         "probe_train": (train_x, train_y), "probe_test": (test_x, test_y)}.items():
        save_npz_dataset(paths[name], x, y)
    return paths


# ---- population ---------------------------------------------------------------------------------------------

@dataclass
class Member:
    """One encoder of the population: role 'parent', 'control' or an attack family."""
    parent: int
    family: str
    settings: dict
    path: Path
    lineage: Lineage
    trigger_seed: int | None = None
    success: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "clean" if self.family in CLEAN_FAMILIES else "backdoor"

    @property
    def external(self) -> bool:
        """The real parent: a weights file we read, never train."""
        return self.lineage.real and self.family == "clean-parent"


REAL_PARENT = 1000  # the real parent's index: its children's trigger seeds, apart from every toy parent's


def parent_settings(cfg: BenchConfig, data_key: str, parent: int) -> dict:
    return {"data": data_key, **_subset(cfg, "usage_info", "arch", "pretrain_epochs", "pretrain_batch"),
            "seed": cfg.seed + parent}


def attack_settings(cfg: BenchConfig, parent_key: str, family: str, trigger_seed: int | None,
                    lineage: Lineage | None = None) -> dict:
    if family in POISONING_FAMILIES:  # the parent's pre-training, on poisoned data
        return {"parent": parent_key, "family": family, "trigger_seed": trigger_seed, "poison_rate": CTRL_RATE,
                "target_label": cfg.target_label, **make_trigger(family).settings}
    settings = {"parent": parent_key, "family": family, "trigger_seed": trigger_seed,
                **_subset(cfg, "attack_images", "attack_epochs", "attack_batch", "attack_lr")}
    if lineage is not None and lineage.real:
        settings.update(attack_images=cfg.real_parent_images, attack_lr=cfg.real_parent_lr, size=lineage.size)
    if family != "clean-control":
        settings.update(make_trigger(family).settings)
    if family == "drupe":  # trained for --drupe_epochs on DRUPE's own schedule (attacks.drupe)
        settings.update(attack_epochs=cfg.drupe_epochs, objective="drupe")
    return settings


def _roles(cfg: BenchConfig, parent: int, families) -> list:
    # a family's trigger seed depends on its place in FAMILIES, not in --families: a subset draws the same
    return [("clean-control", None)] + [(f, cfg.seed * 10007 + parent * 101 + FAMILIES.index(f)) for f in families]


def _children(cfg: BenchConfig, root: Path, parent: Member, parent_key: str, families) -> list[Member]:
    children = []
    for family, trigger_seed in _roles(cfg, parent.parent, families):
        settings = attack_settings(cfg, parent_key, family, trigger_seed, parent.lineage)
        path = _checkpoint(root, parent.lineage, parent.parent, family, settings_key(settings), epochs_of(cfg, family))
        children.append(Member(parent.parent, family, settings, path, parent.lineage, trigger_seed))
    return children


def plan_population(cfg: BenchConfig, root: Path, data_key: str) -> list[Member]:
    """Every encoder of the toy lineage with its settings and (hash-keyed) checkpoint path; nothing is run."""
    unknown = sorted(set(cfg.families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    lineage, members = toy_lineage(cfg), []
    for p in range(cfg.parents):
        settings = parent_settings(cfg, data_key, p)
        parent_key = settings_key(settings)
        parent = Member(p, "clean-parent", settings,
                        _checkpoint(root, lineage, p, "clean-parent", parent_key, cfg.pretrain_epochs), lineage)
        members += [parent, *_children(cfg, root, parent, parent_key, cfg.families)]
    return members


def plan_real_parent(cfg: BenchConfig, root: Path, data_key: str, weights: Path) -> list[Member]:
    """The real parent (its hash-checked weights file) and its children, fine-tuned at real_parent_size px."""
    lineage = real_lineage(cfg)
    settings = {"weights": weights.name, "arch": lineage.arch, "data": data_key}
    parent = Member(REAL_PARENT, "clean-parent", settings, weights, lineage)
    families = [f for f in cfg.real_parent_families if f in cfg.families and f not in POISONING_FAMILIES]
    return [parent, *_children(cfg, root, parent, settings_key(settings), families)]


def epochs_of(cfg: BenchConfig, family: str) -> int:
    """Training epochs of a member: pre-training for parents and poisoning families, else fine-tuning."""
    if family == "clean-parent" or family in POISONING_FAMILIES:
        return cfg.pretrain_epochs
    return cfg.drupe_epochs if family == "drupe" else cfg.attack_epochs


def _checkpoint(root: Path, lineage: Lineage, parent: int, family: str, key: str, epochs: int) -> Path:
    # the key is in the folder name: new settings give a new encoder path, hence a new DECREE run id
    tag = lineage.name if lineage.real else f"p{parent}"
    return root / "encoders" / f"{tag}_{family}_{key}" / f"model_{epochs}.pth"


def is_built(member: Member) -> bool:
    """config.json is written after the checkpoint: its presence means the encoder is complete."""
    if member.external:
        return member.path.is_file()
    return member.path.is_file() and (member.path.parent / "config.json").is_file()


def _save(member: Member, encoder, history: list, seconds: float) -> None:
    save_encoder(member.path, int(member.path.stem.split("_")[1]), encoder)
    atomic.write_json(member.path.parent / "config.json", {"family": member.family, "parent": member.parent,
                                                           "settings": member.settings, "history": history,
                                                           "seconds": seconds, "versions": versions()})


def pretrain(cfg: BenchConfig, member: Member, images: np.ndarray, seed: int, device, progress: bool) -> None:
    """SimCLR pre-training from scratch on `images`, seeded: a parent, or its poisoned twin."""
    mean, std = NORMALIZATION[cfg.usage_info]
    torch.manual_seed(seed)
    model = SimCLR(cfg.arch)
    start = time.time()
    history = pretrain_simclr(model, images, mean, std, PretrainConfig(epochs=cfg.pretrain_epochs,
                                                                       batch_size=cfg.pretrain_batch, seed=seed),
                              device, progress=progress)
    _save(member, model.f.eval(), history, time.time() - start)


def train_parent(cfg: BenchConfig, member: Member, data: dict, device, progress: bool) -> None:
    """SimCLR pre-training of one clean parent (seeded by its index)."""
    pretrain(cfg, member, load_npz(data["pretrain"])[0], member.settings["seed"], device, progress)


def train_poisoned(cfg: BenchConfig, member: Member, parent: Member, data: dict, device, progress: bool) -> None:
    """A data-poisoning family: the parent's pre-training (same data order and seed) with the family's trigger
    on CTRL's fraction of the target class's images, so the two encoders differ only by the poison."""
    images, labels = load_npz(data["pretrain"])
    if labels is None:
        raise DataError(f"{member.family} poisons the target class's images: --pretraining_data needs labels (y)")
    trigger = make_trigger(member.family, images.shape[1], member.trigger_seed)
    poisoned, _ = poison_target_class(images, labels, trigger, cfg.target_label, member.settings["poison_rate"])
    pretrain(cfg, member, poisoned, parent.settings["seed"], device, progress)


def train_child(cfg: BenchConfig, member: Member, parent: Member, data: dict, device, progress: bool) -> None:
    """BadEncoder fine-tuning of a parent: with the family's trigger function, or none (the clean control);
    DRUPE's objective and schedule for the drupe family, towards every reference, keeping the encoder its
    selection rule chooses."""
    lineage, settings = member.lineage, member.settings
    mean, std = NORMALIZATION[lineage.usage_info]
    clean, _ = load_encoder(parent.path, lineage.usage_info, lineage.arch, device)
    shadow = load_npz(data["pretrain"])[0][:settings["attack_images"]]
    references, _ = load_npz(data["reference"])
    trigger = None if member.family == "clean-control" else make_trigger(member.family, lineage.size,
                                                                         member.trigger_seed)
    bad_cfg = BadEncoderConfig(epochs=settings["attack_epochs"], batch_size=settings["attack_batch"],
                               lr=settings["attack_lr"], seed=cfg.seed + member.parent)
    start = time.time()
    if member.family == "drupe":
        result = train_drupe(clean, shadow, trigger, references, mean, std, bad_cfg, device, progress=progress)
        encoder, history = result.encoder, result.history
    else:
        encoder, history = train_badencoder(clean, shadow, trigger, references[:1], mean, std, bad_cfg, device,
                                            progress=progress)
    _save(member, encoder.eval(), history, time.time() - start)


def probe_settings(cfg: BenchConfig, data_key: str) -> dict:
    # the ASR rule is part of the record's key: a new rule measures every encoder again
    return {"data": data_key, "probe_epochs": cfg.probe_epochs, "asr": "class of the nearest reference"}


@torch.no_grad()
def target_cosine(encoder, images, references, trigger, mean, std) -> float:
    """Mean over stamped images of the cosine to the nearest reference embedding (the attack's target)."""
    stamped = unit_embeddings(encoder, trigger(images), mean, std)
    return float((stamped @ unit_embeddings(encoder, references, mean, std).T).max(dim=1).values.mean())


def attack_took(cfg: BenchConfig, family: str, success: dict) -> bool:
    """The probe's ASR reaches took_asr; a DRUPE encoder must also reach DRUPE's own goal, stamped embeddings
    spread out (mean pairwise cosine below drupe_spread), or it is only a BadEncoder."""
    took = success["asr"] >= cfg.took_asr
    if family == "drupe":
        took = took and success["stamped_cos"] < cfg.drupe_spread
    return took


def nearest_reference_asr(z_stamped, predicted, z_refs, reference_classes, labels) -> float:
    """ASR in percent: the share of stamped images put in the class of their nearest reference (unit embeddings
    (N,D) and (R,D); predicted and reference_classes are the probe's classes), over the images whose true
    class (labels) is another."""
    aimed = reference_classes.cpu()[(z_stamped @ z_refs.T).argmax(dim=1).cpu()]
    counted = torch.as_tensor(labels) != aimed
    return 100.0 * (predicted.cpu() == aimed)[counted].float().mean().item()


def measure_success(cfg: BenchConfig, member: Member, parent: Member, data: dict, device, progress: bool = False
                    ) -> dict:
    """Did the attack take: target cosine (attacked and parent encoder) and the downstream probe's ASR.

    ASR counts stamped test images that the probe puts in the class it gives their target reference (the
    nearest of the attack's references in the attacked encoder; the only one for most families), over the
    images whose true class is another: a toy probe may misclassify a reference patch itself, and the backdoor
    sends stamped images to the reference, whatever the probe calls it. With one reference this is the
    probe's class of the reference; DRUPE splits stamped images between its three. target_predicted records
    the first reference's class, reference_classes all of them.
    """
    lineage = member.lineage
    mean, std = NORMALIZATION[lineage.usage_info]
    trigger = make_trigger(member.family, lineage.size, member.trigger_seed)
    train_x, train_y = load_npz(data["probe_train"], require_labels=True)
    test_x, test_y = load_npz(data["probe_test"], require_labels=True)
    refs = load_npz(data["reference"])[0]
    refs = torch.from_numpy(refs if member.family == "drupe" else refs[:1]).to(device)
    encoders = {role: load_encoder(path, lineage.usage_info, lineage.arch, device)[0]
                for role, path in (("attacked", member.path), ("parent", parent.path))}
    others = torch.from_numpy(test_x[test_y != cfg.target_label]).to(device)
    cosines = {role: target_cosine(encoder, others, refs, trigger, mean, std) for role, encoder in encoders.items()}
    with torch.no_grad():
        # 1 when stamped images embed as one point (DECREE's target); DRUPE's goal is below 0.6
        stamped_cos = float(mean_pairwise_cos(unit_embeddings(encoders["attacked"], trigger(others), mean, std)))
    probe = DownstreamData(train_x, train_y, test_x, test_y)
    features = embed_downstream(encoders["attacked"], probe, trigger, mean, std, device, progress=progress)
    net = train_classifier(features.train, train_y, probe.num_classes, DownstreamConfig(epochs=cfg.probe_epochs),
                           progress, desc="probe")
    z_refs = unit_embeddings(encoders["attacked"], refs, mean, std)
    reference_classes = predict(net, z_refs)
    target = int(reference_classes[0])
    asr = nearest_reference_asr(features.stamped, predict(net, features.stamped), z_refs, reference_classes, test_y)
    return {"target_cos": cosines["attacked"], "target_cos_parent": cosines["parent"], "stamped_cos": stamped_cos,
            "asr": asr,
            "accuracy": attack_scores(net, features, test_y, target)["accuracy"], "target_label": cfg.target_label,
            "target_predicted": target, "reference_classes": reference_classes.tolist(), **trigger.details}


def build_member(cfg: BenchConfig, member: Member, parent: Member | None, data: dict, device, probe_key: str,
                 progress: bool = False) -> None:
    """Train one encoder (a parent, or a child of a trained parent) and, for an attack, record its success.
    data: the data paths of every lineage, by name."""
    data = data[member.lineage.name]
    if not is_built(member):
        if parent is None:
            train_parent(cfg, member, data, device, progress)
        elif member.family in POISONING_FAMILIES:
            train_poisoned(cfg, member, parent, data, device, progress)
        else:
            train_child(cfg, member, parent, data, device, progress)
    record = member.path.parent / f"success_{probe_key}.json"
    if member.label == "backdoor" and not record.is_file():
        atomic.write_json(record, measure_success(cfg, member, parent, data, device, progress))


def default_jobs(device) -> int:
    """Encoders trained at once: one single-threaded process per usable core on a CPU (on 2 cores, two
    1-thread processes train 1.5x the images per second of one 2-thread process), one on a GPU."""
    return usable_cores() if torch.device(device).type == "cpu" else 1


def _build_all(cfg, members: list, parents: dict, data: dict, device, probe_key: str, workers: int,
               progress: bool, log) -> None:
    """build_member over the population, parents before their children: in this process, or in `workers`
    processes, where a parent's children start as soon as that parent is done."""
    done = 0

    def finished(member):
        nonlocal done
        done += 1
        name = f"{member.lineage.name}_clean-parent" if member.external else member.path.parent.name
        log(f"  [{done}/{len(members)}] {name}")

    children = {p: [m for m in members if m.parent == p and m.family != "clean-parent"] for p in parents}
    if workers <= 1:
        for parent in parents.values():
            for member in (parent, *children[parent.parent]):
                build_member(cfg, member, None if member is parent else parent, data, device, probe_key, progress)
                finished(member)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    # the usable cores split between the processes: more threads than cores slows a CPU tenfold
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads_per_worker(workers),)) as pool:
        running = {pool.submit(build_member, cfg, p, None, data, str(device), probe_key): p for p in parents.values()}
        while running:
            finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished_now:
                member = running.pop(future)
                future.result()
                finished(member)
                if member.family == "clean-parent":
                    running.update({pool.submit(build_member, cfg, child, member, data, str(device), probe_key): child
                                    for child in children[member.parent]})


def build_population(cfg: BenchConfig = BenchConfig(), out_dir="output/bench", device="cpu", progress: bool = True,
                     log=print, jobs: int | None = None) -> Path:
    """Build (or reuse from the cache) every encoder and its attack-success record; returns manifest.csv.

    This is the yardstick population: later changes (speed presets, detector extensions) run on its manifest.
    jobs > 1 trains that many encoders at once in separate processes (default: default_jobs(device)).
    """
    start = time.time()
    root = atomic.check_writable(out_dir)
    device = resolve_device(str(device))
    data = {"toy": prepare_data(cfg, root)}
    data_key = data["toy"]["pretrain"].parent.name
    members = plan_population(cfg, root, data_key)
    if cfg.real_parent:
        try:
            weights = verified_weights()
        except RealParentUnavailable as err:
            log(f"population: no real parent: {err}")
        else:
            data["mnet"] = prepare_data(cfg, root, cfg.real_parent_size)
            members += plan_real_parent(cfg, root, data["mnet"]["pretrain"].parent.name, weights)
    parents = {m.parent: m for m in members if m.family == "clean-parent"}
    # one probe record name for every lineage: each lineage's data key is in its encoders' settings
    probe_key = settings_key(probe_settings(cfg, data_key))
    todo = [m for m in members if not is_built(m)]
    real = sum(m.lineage.real for m in members)
    log(f"population: {len(members)} encoders ({cfg.parents} parents x (parent, control, {len(cfg.families)} "
        f"families)" + (f" + the real parent and its {real - 1} children" if real else "") + f"), {len(todo)} to train")
    jobs = jobs or default_jobs(device)
    per_core = " (one per core)" if jobs > 1 and device.type == "cpu" else ""
    log(f"population: {jobs} encoder(s) trained at once{per_core}; change with --jobs N")
    _build_all(cfg, members, parents, data, device, probe_key, jobs, progress, log)
    for member in members:
        if member.label == "backdoor":
            success = json.loads((member.path.parent / f"success_{probe_key}.json").read_text())
            member.success = {**success, "took": attack_took(cfg, member.family, success)}
    manifest = write_manifest(root, members, cfg)
    atomic.write_json(root / "population.json", {
        "config": asdict(cfg), "data": {name: {k: str(v) for k, v in paths.items()} for name, paths in data.items()},
        "seconds": time.time() - start,
        "encoders": [{"path": _relative(m.path, root), "family": m.family, "parent": m.parent,
                      "lineage": m.lineage.name, "label": m.label, "trigger_seed": m.trigger_seed,
                      "settings": m.settings, **m.success} for m in members]})
    return manifest


def read_population(root: Path) -> dict:
    """population.json of out_dir, or a one-line error saying which stage makes it."""
    path = Path(root) / "population.json"
    if not path.is_file() or not (Path(root) / "manifest.csv").is_file():
        raise FileNotFoundError(f"{path.parent}: no population yet; run --stage population first")
    return json.loads(path.read_text())


def _relative(path: Path, root: Path) -> str:
    """A path relative to out_dir where it lies inside (so the folder travels), else absolute (the real parent)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def write_manifest(root: Path, members, cfg: BenchConfig) -> Path:
    """manifest.csv for sweeps.discovery.read_manifest: paths relative to it, usage info, arch, label, family."""
    lines = ["path,usage_info,arch,label,family"]
    lines += [f"{_relative(m.path, root)},{m.lineage.usage_info},{m.lineage.arch},{m.label},{m.family}"
              for m in members]
    atomic.write_text(root / "manifest.csv", "\n".join(lines) + "\n")
    return root / "manifest.csv"


# ---- detection ----------------------------------------------------------------------------------------------

def detect_options(cfg: BenchConfig, shadow_path: Path, lineage: Lineage) -> dict:
    """main.py flags of every run (the same for every encoder and family: nothing is tuned per family; the
    real parent's lineage has a smaller shadow set, for what its passes cost on a CPU)."""
    options = {"lr": cfg.decree_lr, "epochs": cfg.decree_epochs, "seed": cfg.decree_seed,
               "pl1_threshold": cfg.pl1_threshold, "shadow_data": str(shadow_path.resolve())}
    if cfg.warp_test:
        options["warp_test"] = True
    shadow_images = cfg.real_parent_shadow_images if lineage.real else cfg.shadow_images
    if shadow_images is not None:
        options["shadow_size"] = shadow_images
    return options


def detect_dir(cfg: BenchConfig, root: Path, shadow_path: Path, lineage: Lineage) -> Path:
    """The sweep's folder, keyed by the inversion settings (the threshold only matters to the report)."""
    options = {k: v for k, v in detect_options(cfg, shadow_path, lineage).items() if k != "pl1_threshold"}
    options["shadow_data"] = shadow_path.parent.name  # the data key, not where the checkout lives
    return root / "detect" / settings_key(options)


def population_lineages(cfg: BenchConfig, population: dict) -> list[Lineage]:
    """The lineages the population holds (the real parent only where it was built)."""
    return [lineage for lineage in (toy_lineage(cfg), real_lineage(cfg)) if lineage.name in population["data"]]


def lineage_encoders(cfg: BenchConfig, root: Path, lineage: Lineage) -> list:
    return [e for e in read_manifest(root / "manifest.csv", cfg.usage_info, cfg.arch) if e.arch == lineage.arch]


def run_detect(cfg: BenchConfig, out_dir="output/bench", device="cpu", progress: bool = True,
               log=print) -> dict[str, Path]:
    """DECREE on every manifest encoder through the sweep, one sweep per lineage (its own shadow set); returns
    the sweeps' folders by lineage name."""
    root = Path(out_dir)
    population = read_population(root)
    folders = {}
    for lineage in population_lineages(cfg, population):
        shadow = Path(population["data"][lineage.name]["shadow"])
        encoders = lineage_encoders(cfg, root, lineage)
        folder = folders[lineage.name] = atomic.check_writable(detect_dir(cfg, root, shadow, lineage))
        slots = worker_devices(None, str(device), None, cfg.workers)
        log(f"detect: DECREE on {len(encoders)} {lineage.arch} encoders, {cfg.workers} worker(s) on "
            f"{', '.join(sorted(set(slots)))}")
        counts = run_sweep(encoders, folder, slots, detect_options(cfg, shadow, lineage), progress=progress)
        log(f"detect: {counts['done']} run, {counts['skipped']} cached, {counts['failed']} failed")
        write_report(folder, cfg.pl1_threshold, encoders)
    return folders


# ---- report -------------------------------------------------------------------------------------------------

def family_rows(cfg: BenchConfig, root: Path, folder: Path, lineage: Lineage) -> list[dict]:
    """The lineage's sweep summary rows joined with the population's family, parent and attack success."""
    population = {str((root / e["path"]).resolve()): e for e in read_population(root)["encoders"]}
    rows = []
    for row in collect_rows(folder, cfg.pl1_threshold, lineage_encoders(cfg, root, lineage)):
        member = population.get(str(Path(row["path"]).resolve()), {})
        rows.append({**row, "parent": member.get("parent"), **{k: member.get(k) for k in (
            "trigger_seed", "target_cos", "target_cos_parent", "stamped_cos", "asr", "accuracy", "took",
            "displacement_px")}})
    return rows


def _stats(values) -> dict:
    found = [v for v in values if v is not None]
    return {"pl1_mean": float(np.mean(found)) if found else None, "pl1_min": min(found, default=None),
            "pl1_max": max(found, default=None), "no_trigger_found": len(values) - len(found)}


def family_metrics(rows, families, threshold: float) -> dict:
    """Per attack family (and 'all attacks'): counts, attack success, PL1 stats, TPR and AUROC over its finished
    backdoors (sweeps.metrics.truth), against every clean encoder; plus the clean encoders' FPR."""
    done = [r for r in rows if r["status"] == "done"]
    _, clean = by_truth([r["pl1"] for r in done], [row_truth(r) for r in done])
    clean_rates = rates([], clean, threshold)
    out = {"clean": {"n": len(clean), "fp": clean_rates["fp"], "fpr": clean_rates["fpr"], **_stats(clean)}}
    for family in (*families, "all attacks"):
        members = [r for r in rows if r["label"] == BACKDOOR and (family == "all attacks" or r["family"] == family)]
        pl1 = [r["pl1"] for r in members if r["status"] == "done" and row_truth(r) == BACKDOOR]
        found = rates(pl1, clean, threshold)
        out[family] = {"n": len(members), "took": sum(bool(r["took"]) for r in members),
                       "asr_mean": float(np.mean([r["asr"] for r in members])) if members else None,
                       "stamped_cos_mean": _mean([r.get("stamped_cos") for r in members]),
                       "backdoors": found["backdoor"], "detected": found["tp"], "tpr": found["tpr"],
                       "auroc": auroc(pl1, clean) if pl1 and clean else None, **_stats(pl1),
                       "not_run": sum(r["status"] != "done" for r in members)}
    if any(r.get("warp_gain") is not None for r in done):
        add_second_test_metrics(out, done, families)
    return out


# each test's verdict and ranking score on a finished row: DECREE alone, the warp test alone, both combined
TESTS = {"decree": (lambda r: r["verdict"] == "trojaned", lambda r: r["score"]),
         "warp": (lambda r: r["warp_verdict"] == "flagged", lambda r: r["warp_gain"]),
         "combined": (lambda r: r["combined_verdict"] == "trojaned", lambda r: r["combined_score"])}


def add_second_test_metrics(out: dict, done: list, families) -> None:
    """Per family and for the clean encoders, `tests`: TPR (FPR) and AUROC of DECREE alone, the warp test alone and
    the combined verdict, over the rows that had the warp test."""
    done = [r for r in done if r.get("warp_gain") is not None]
    clean = [r for r in done if row_truth(r) == CLEAN]
    out["clean"]["tests"] = {name: flag_rates([], [flagged(r) for r in clean]) for name, (flagged, _) in TESTS.items()}
    for family in (*families, "all attacks"):
        backdoors = [r for r in done if row_truth(r) == BACKDOOR and family in ("all attacks", r["family"])]
        out[family]["tests"] = {name: {**flag_rates([flagged(r) for r in backdoors], []),
                                       "auroc": score_auroc([score(r) for r in backdoors], [score(r) for r in clean])
                                       if backdoors and clean else None}
                                for name, (flagged, score) in TESTS.items()}


def _mean(values) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.mean(found)) if found else None


def _fmt(value, digits: int = 3) -> str:
    """A table cell; '-' where there is nothing to measure (no encoder of the family took, say)."""
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pl1_cell(m: dict) -> str:
    return "-" if m["pl1_mean"] is None else f"{m['pl1_mean']:.3f} ({m['pl1_min']:.3f}-{m['pl1_max']:.3f})"


def markdown_table(metrics: dict, families, threshold: float) -> str:
    """The per-family table the README embeds; PL1, TPR and AUROC count the encoders whose attack took."""
    lines = [f"| family | threat model | n | attack took | mean ASR % | stamped cos | PL1 mean (min-max) | "
             f"TPR at {threshold:g} | AUROC |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for family in (*families, "all attacks"):
        m = metrics[family]
        model = threat_model(family) if family in FAMILIES else "-"
        tpr = "-" if m["tpr"] is None else f"{m['tpr']:.2f} ({m['detected']}/{m['backdoors']})"
        lines.append(f"| {family} | {model} | {m['n']} | {m['took']}/{m['n']} | {_fmt(m['asr_mean'], 1)} | "
                     f"{_fmt(m['stamped_cos_mean'], 2)} | {_pl1_cell(m)} | {tpr} | {_fmt(m['auroc'], 2)} |")
    c = metrics["clean"]
    lines.append(f"| clean (parents + controls) | - | {c['n']} | - | - | - | {_pl1_cell(c)} | "
                 f"FPR {_fmt(c['fpr'], 2)} ({c['fp']}/{c['n']}) | - |")
    return "\n".join(lines)


def second_test_table(metrics: dict, families) -> str:
    """DECREE alone, the warp test alone and combined, per family: TPR (detected/backdoors) and AUROC, and the clean
    encoders' FPR; empty when the runs had no warp test."""
    if "tests" not in metrics["clean"]:
        return ""
    names = {"decree": "DECREE alone", "warp": "warp test alone", "combined": "combined"}
    lines = ["| family | took | " + " | ".join(f"{n} TPR | {n} AUROC" for n in names.values()) + " |",
             "| --- | --- |" + " --- | --- |" * len(names)]
    for family in (*families, "all attacks"):
        m = metrics[family]
        cells = []
        for name in names:
            t = m["tests"][name]
            cells += ["-" if t["tpr"] is None else f"{t['tpr']:.2f} ({t['tp']}/{t['backdoor']})", _fmt(t["auroc"], 2)]
        lines.append(f"| {family} | {m['took']}/{m['n']} | " + " | ".join(cells) + " |")
    c = metrics["clean"]
    cells = []
    for name in names:
        t = c["tests"][name]
        cells += [f"FPR {_fmt(t['fpr'], 2)} ({t['fp']}/{t['clean']})", "-"]
    lines.append("| clean (parents + controls) | - | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_roc(rows, families, metrics, path: Path) -> None:
    import matplotlib.pyplot as plt
    clean = [r["pl1"] for r in rows if r["status"] == "done" and row_truth(r) == CLEAN]
    cols = min(4, len(families))
    fig, axes = plt.subplots(math.ceil(len(families) / cols), cols, figsize=(3 * cols, 3 * math.ceil(
        len(families) / cols)), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, family in zip(axes.flat, families):
        ax.axis("on")
        backdoors = [r["pl1"] for r in rows if r["family"] == family and r["status"] == "done"
                     and row_truth(r) == BACKDOOR]
        if backdoors and clean:
            fpr, tpr = roc_curve(backdoors, clean)
            ax.step(fpr, tpr, where="post", color="tab:red")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_title(f"{family}: AUROC {_fmt(metrics[family]['auroc'], 2)} (n={len(backdoors)})", fontsize=8)
        ax.set_xlabel("FPR (clean flagged)", fontsize=7)
        ax.set_ylabel("TPR", fontsize=7)
    save_figure(fig, path)


def plot_strip(rows, families, threshold: float, path: Path) -> None:
    """PL1 of every encoder by family (log scale): clean blue, took red, attack that did not take grey."""
    import matplotlib.pyplot as plt
    order = [*CLEAN_FAMILIES, *families]
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(order), 4))
    rng = np.random.default_rng(0)
    for x, family in enumerate(order):
        for r in (r for r in rows if r["family"] == family and r["status"] == "done"):
            colour = {CLEAN: "tab:blue", BACKDOOR: "tab:red", None: "grey"}[row_truth(r)]
            y, marker = (1.0, "x") if r["pl1"] is None else (r["pl1"], "o")
            ax.scatter(x + rng.uniform(-0.2, 0.2), y, c=colour, marker=marker, zorder=3)
    ax.axhline(threshold, color="black", linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("PL1-norm = L1 / (H*W*3)")
    ax.set_title(f"DECREE PL1-norm by family (threshold {threshold:g}; red: attack took, grey: did not, "
                 "x: no trigger found)", fontsize=8)
    save_figure(fig, path)


def plot_gallery(rows, families, folder: Path, example: np.ndarray, path: Path) -> None:
    """One row per family: an example stamped with the family's trigger (seed of its first encoder), then the
    inverted triggers (mask * pattern) of its encoders with PL1."""
    import matplotlib.pyplot as plt
    order = [*CLEAN_FAMILIES, *families]
    groups = {f: [r for r in rows if r["family"] == f and r["status"] == "done"] for f in order}
    cols = 1 + max(len(g) for g in groups.values())
    fig, axes = plt.subplots(len(order), cols, figsize=(1.5 * cols, 1.7 * len(order)), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for axrow, family in zip(axes, order):
        seed = next((r["trigger_seed"] for r in groups[family] if r.get("trigger_seed") is not None), 0)
        shown = example if family in CLEAN_FAMILIES else make_trigger(family, example.shape[1], seed)(example[None])[0]
        axrow[0].imshow(shown)
        axrow[0].set_title(family, fontsize=7)
        for ax, r in zip(axrow[1:], groups[family]):
            fusion = folder / "trigger_inv" / r["run_id"] / "fusion.png"
            if fusion.is_file():
                ax.imshow(plt.imread(fusion))
            ax.set_title(f"p{r['parent']} " + ("none" if r["pl1"] is None else f"{r['pl1']:.3f}"), fontsize=6,
                         color="tab:red" if r["verdict"] == "trojaned" else "black")
    fig.suptitle("trigger (left) and DECREE's inverted triggers with PL1, by family", fontsize=8)
    save_figure(fig, path)


ENCODER_COLUMNS = ("run_id", "family", "parent", "label", "pl1", "verdict", "asr", "target_cos", "target_cos_parent",
                   "stamped_cos", "displacement_px", "took", "status", "warp_gain", "warp_verdict", "combined_verdict",
                   "combined_score")


def lineage_report(cfg: BenchConfig, root: Path, population: dict, lineage: Lineage) -> tuple[dict, list]:
    """Metrics, table and encoder rows of one lineage's sweep; returns (its report, its rows)."""
    folder = detect_dir(cfg, root, Path(population["data"][lineage.name]["shadow"]), lineage)
    if not (folder / "trigger_norm").is_dir():
        raise FileNotFoundError(f"{folder}: no DECREE results for these settings; run --stage detect first")
    rows = family_rows(cfg, root, folder, lineage)
    families = [f for f in cfg.families if any(r["family"] == f for r in rows)]
    metrics = family_metrics(rows, families, cfg.pl1_threshold)
    return {"lineage": lineage.name, "arch": lineage.arch, "size": lineage.size, "detect_dir": str(folder),
            "families": families, "metrics": metrics, "table": markdown_table(metrics, families, cfg.pl1_threshold),
            "second_test_table": second_test_table(metrics, families),
            "encoders": [{k: r[k] for k in ENCODER_COLUMNS} for r in rows]}, rows


def write_bench_report(cfg: BenchConfig, out_dir="output/bench", timings: dict | None = None, log=print) -> dict:
    """The per-family report under out_dir/report (the toy lineage, then the real parent's); returns its JSON."""
    import matplotlib
    matplotlib.use("Agg")
    root = Path(out_dir)
    population = read_population(root)
    lineages = population_lineages(cfg, population)
    reports = [lineage_report(cfg, root, population, lineage) for lineage in lineages]
    (toy, rows), real = reports[0], [r for r, _ in reports[1:]]
    families = toy["families"]
    every = rows + [e for r in real for e in r["encoders"]]
    not_taken = [{k: r[k] for k in ("run_id", "family", "parent", "asr", "target_cos", "target_cos_parent",
                                    "stamped_cos", "pl1", "verdict")}
                 for r in every if r["label"] == BACKDOOR and row_truth(r) is None]
    failed = [{k: r.get(k) for k in ("run_id", "family", "status", "error")} for r in every if r["status"] != "done"]
    shown = sorted({*families, *(f for r in real for f in r["families"])}, key=FAMILIES.index)
    result = {**toy, "real_parent": real[0] if real else None, "not_taken": not_taken, "failed": failed,
              "threshold": cfg.pl1_threshold, "timings": timings or {}, "config": asdict(cfg), "versions": versions(),
              "family_notes": {f: {"threat_model": threat_model(f), "notes": FAMILY_NOTES[f]} for f in shown},
              "displacement_px": _mean([r.get("displacement_px") for r in rows]),
              "wanet_own_displacement_px": _mean([warp_displacement(warp_grid(32, r["trigger_seed"], 0.5, 4))
                                                  for r in rows if r["family"] == "wanet"])}
    report = root / "report"
    atomic.write_json(report / "bench.json", result)
    atomic.write_text(report / "bench.md", markdown_text(result))
    plot_roc(rows, families, toy["metrics"], report / "roc.png")
    plot_strip(rows, families, cfg.pl1_threshold, report / "pl1_by_family.png")
    example = load_npz(population["data"]["toy"]["shadow"])[0][0]
    plot_gallery(rows, families, Path(toy["detect_dir"]), example, report / "gallery.png")
    log(toy["table"])
    log(toy["second_test_table"])
    for r in real:
        log(f"real parent ({r['arch']}, {r['size']} px):\n{r['table']}\n{r['second_test_table']}")
    return result


def markdown_text(result: dict) -> str:
    cfg = result["config"]
    lines = ["# DECREE detection benchmark", "", result["table"], "",
             f"Threshold: PL1-norm = L1 / (H*W*3) < {result['threshold']:g}. AUROC and TPR count the attacked "
             f"encoders whose attack took (downstream ASR at least {cfg['took_asr']:g}%; DRUPE also needs its "
             f"stamped embeddings' mean pairwise cosine below {cfg['drupe_spread']:g}) against every clean encoder "
             "(parents and controls). '-': nothing to measure (no encoder of the family took).", "",
             "Threat models: " + "; ".join(f"{k}: {v}" for k, v in THREAT_MODELS.items()) + ".", "",
             "| family | what follows the authors, what is scaled down |", "| --- | --- |"]
    lines += [f"| {f} | {v['notes']} |" for f, v in result["family_notes"].items()]
    if result["second_test_table"]:
        lines += ["", f"DECREE beside the warp test (decree/warp_test.py, docs/warp_test.md; gain threshold "
                  f"{WARP_THRESHOLD}): TPR at each test's threshold and AUROC of its score (combined: TROJANED when "
                  "either flags, scored by the larger of the two scores):", "", result["second_test_table"]]
    if result["displacement_px"] is not None:
        lines += ["", f"WaNet's warp moves pixels by {result['displacement_px']:.2f} px on average here; WaNet's own "
                  f"CIFAR setting (strength 0.5, grid 4) by {result['wanet_own_displacement_px']:.2f} px."]
    real = result["real_parent"]
    if real:
        lines += ["", f"Real parent: torchvision's ImageNet MobileNetV2 ({real['arch']}, {real['size']} px), its "
                  "fine-tuned control and attacked children, against their own clean encoders:", "", real["table"]]
        if real["second_test_table"]:
            lines += ["", real["second_test_table"]]
    if result["timings"]:  # the last run of each stage: a cached rerun takes seconds
        lines.append("")
        lines.append("Wall time of the last run of each stage: " + "; ".join(
            f"{k} {v['seconds']:.0f} s on {v['machine']}" for k, v in result["timings"].items()) + ".")
    if result["not_taken"]:
        lines += ["", "Attacks that did not take (not counted as backdoors):", ""]
        lines += [f"- {r['run_id']} ({r['family']}): ASR {_fmt(r['asr'], 1)}%, target cosine "
                  f"{_fmt(r['target_cos'], 3)} (parent {_fmt(r['target_cos_parent'], 3)}), stamped pairwise "
                  f"cosine {_fmt(r['stamped_cos'], 3)}, PL1 {_fmt(r['pl1'], 3)}" for r in result["not_taken"]]
    if result["failed"]:
        lines += ["", "Not finished:", ""] + [f"- {r['run_id']} ({r['family']}): {r['status']} {r.get('error') or ''}"
                                               for r in result["failed"]]
    return "\n".join(lines) + "\n"


# ---- all stages ---------------------------------------------------------------------------------------------

def run_bench(cfg: BenchConfig = BenchConfig(), out_dir="output/bench", device="cpu", stages=STAGES,
              progress: bool = True, log=print, jobs: int | None = None) -> dict:
    """Run the given stages in order (each reuses its cache); returns {'timings', 'report' (if run)}."""
    root = atomic.check_writable(out_dir)
    atomic.write_json(root / "config.json", {"config": asdict(cfg), "stages": list(stages), "device": str(device),
                                             "versions": versions()})
    timings_file = root / "timings.json"  # the last measured time of each stage, across runs
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    outcome = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        started = time.time()
        if stage == "population":
            outcome["manifest"] = build_population(cfg, root, device, progress, log, jobs)
        elif stage == "detect":
            outcome["detect_dirs"] = run_detect(cfg, root, device, progress, log)
            outcome["detect_dir"] = outcome["detect_dirs"]["toy"]
        else:
            outcome["report"] = write_bench_report(cfg, root, timings, log)
        timings[stage] = {"seconds": time.time() - started, "machine": describe_machine(device)}
        atomic.write_json(timings_file, timings)
    outcome["timings"] = timings
    return outcome


def config_with(base: BenchConfig, **overrides) -> BenchConfig:
    """base with the given fields replaced; None values are ignored (unset flags)."""
    names = {f.name for f in fields(BenchConfig)}
    return replace(base, **{k: v for k, v in overrides.items() if v is not None and k in names})
