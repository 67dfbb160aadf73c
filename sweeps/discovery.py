"""Which encoders a sweep runs: the paper's output/ folders, shell globs or a manifest CSV, each with its label."""
import csv
import fnmatch
from dataclasses import dataclass
from pathlib import Path

from models import DEFAULT_USAGE_INFO, USAGE_INFOS, CheckpointError
from models.formats import WEIGHT_NAMES, hub_folder_of, usage_info_from

from common.files import safe_glob, walk_files
from decree.outputs import run_id_for
from .metrics import BACKDOOR, CLEAN

CHECKPOINT_PATTERNS = ("*.pth", "*.pt", "*.safetensors")  # what folder discovery and ** globs pick up
# a file a glob names directly may also be a hub's torch weights (pytorch_model.bin): main.py reads them all
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
LABELS = (CLEAN, BACKDOOR)
UNKNOWN = "unknown"  # the label of an encoder whose truth nobody gave (not in the paper's folders, no manifest label)
# the paper's folders under output/: the first folder names the usage info
USAGE_FOLDERS = {"cifar10": "cifar10", "stl10": "stl10", "imagenet": "imagenet", "CLIP": "CLIP",
                 "CLIP_text": "CLIP", "moco": "moco"}
MANIFEST_COLUMNS = ("path", "usage_info", "arch", "label", "reference", "reference_text", "family")


@dataclass(frozen=True)
class Encoder:
    """One encoder of a sweep; label is 'clean', 'backdoor' or 'unknown'; reference/reference_text: its attack's
    known target; family: the manifest's free-text group (attack)."""
    path: str
    usage_info: str
    arch: str | None
    label: str
    reference: str | None = None
    reference_text: str | None = None
    family: str = ""

    @property
    def run_id(self) -> str:
        return run_id_for(self.path)


def infer_label(path) -> str:
    """The paper's rule for the paper's folders (discover_output_folder): 'clean' anywhere in the path means a
    clean encoder, anything else a backdoored one. Elsewhere the truth is unknown unless a manifest gives it."""
    return "clean" if "clean" in str(path).lower() else "backdoor"


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in CHECKPOINT_PATTERNS)


def _sorted_unique(encoders) -> list[Encoder]:
    """Stable order (by path) without duplicates of the same file, so shards and run ids never disagree."""
    seen, unique = set(), []
    for enc in sorted(encoders, key=lambda e: e.path):
        key = str(Path(enc.path).resolve())
        if key not in seen:
            seen.add(key)
            unique.append(enc)
    return unique


def discover_output_folder(root="output", arch: str | None = None) -> list[Encoder]:
    """The paper's layout: root/<usage>/**/*.pth|*.pt (and *.safetensors); CLIP_text/ holds CLIP encoders; other
    folders ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--output_root {root}: no such folder; for a folder of downloaded encoders pass "
                                "--encoders FOLDER (each hub folder one encoder, its family read from its config), "
                                f"else put them in {root}/<usage_info>/... or pass --manifest CSV")
    encoders = [Encoder(str(path), usage, arch, infer_label(path.relative_to(root)))
                for folder, usage in USAGE_FOLDERS.items() if (root / folder).is_dir()
                for path in walk_files(root / folder) if _is_checkpoint(path)]
    if not encoders:
        raise FileNotFoundError(_nothing_found(root))
    return _sorted_unique(encoders)


def _nothing_found(root: Path) -> str:
    """Where discovery looked, and the flags that would find the checkpoints lying elsewhere under root."""
    looked = ", ".join(f"{root / folder}/" for folder in USAGE_FOLDERS)
    message = f"no *.pth/*.pt/*.safetensors checkpoints in the paper's folders {looked}"
    # the top folder under root of every other checkpoint (root itself for one lying directly in it)
    others = sorted({root / path.relative_to(root).parts[0] if path.parent != root else root
                     for path in walk_files(root) if _is_checkpoint(path)})
    if others:
        hints = " or ".join(f"--encoders {top}" for top in others[:3])
        message += (f"; other checkpoints are under {', '.join(f'{top}/' for top in others)}: pass {hints} "
                    "(hub folders' families are read from their configs; --encoder_usage_info/--arch for paper "
                    "checkpoints that are not cifar10 ones), or list them in --manifest CSV")
    else:
        message += ("; for a folder of downloaded encoders pass --encoders FOLDER, else --output_root FOLDER or "
                    "--manifest CSV")
    return message


def _weights_at(path: Path) -> list[Path]:
    """What a glob match stands for: the file itself if it is a weights file, the checkpoints inside a folder;
    a hub folder's weights (any of them) stand for the folder, one encoder (models.formats.hub_folder_of)."""
    if path.is_file():
        found = [path] if path.suffix in WEIGHT_FILE_SUFFIXES else []
    else:
        found = [p for p in walk_files(path) if _is_checkpoint(p) or (p.name in WEIGHT_NAMES and p.is_file())]
    return [hub_folder_of(p) or p for p in found]


def detected_usage_info(path, usage_info: str | None) -> str:
    """The usage info given (--encoder_usage_info, a manifest cell), else the hub family the path's config names,
    else the default; an unreadable config is left for the encoder's own run to report."""
    if usage_info:
        return usage_info
    try:
        return usage_info_from(path) or DEFAULT_USAGE_INFO
    except (CheckpointError, OSError):
        return DEFAULT_USAGE_INFO


def discover_globs(patterns, usage_info: str | None, arch: str | None = None) -> list[Encoder]:
    """Checkpoints matching shell globs (** recursive, symlinked folders never entered: common/files.py): weight
    files the glob names, and the checkpoints inside folders it names, each hub folder once; a pattern that
    matches none is an error. Their truth is unknown."""
    encoders = []
    for pattern in patterns:
        matches = [p for match in safe_glob(pattern) for p in _weights_at(Path(match))]
        if not matches:
            raise FileNotFoundError(f"--encoders {pattern!r}: matches no .pth/.pt/.safetensors/.bin file")
        encoders += [Encoder(str(p), detected_usage_info(p, usage_info), arch, UNKNOWN) for p in matches]
    return _sorted_unique(encoders)


def read_manifest(path, usage_info: str | None = None, arch: str | None = None) -> list[Encoder]:
    """CSV with columns path[,usage_info][,arch][,label][,reference][,reference_text][,family]; empty cells take
    the command-line defaults (reference: the attack's reference npz; reference_text: its target caption;
    family: a free group name carried into the report).

    Relative paths (encoders, references) are relative to the manifest's folder, so a manifest travels with them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--manifest {path}: no such file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise ValueError(f"{path}: needs a header with a 'path' column (optional: "
                             f"{', '.join(MANIFEST_COLUMNS[1:])}); found {columns or 'an empty file'}")
        unknown = set(columns) - set(MANIFEST_COLUMNS)
        if unknown:
            raise ValueError(f"{path}: unknown column(s) {sorted(unknown)}; use {', '.join(MANIFEST_COLUMNS)}")
        encoders = [_manifest_row(path, line, {k.strip(): (v or "").strip() for k, v in row.items() if k},
                                  usage_info, arch)
                    for line, row in enumerate(reader, start=2)]
    if not encoders:
        raise ValueError(f"{path}: lists no encoders")
    return _sorted_unique(encoders)


def _manifest_row(manifest: Path, line: int, row: dict, usage_info: str, arch: str | None) -> Encoder:
    where = f"{manifest}:{line}"
    if not row.get("path"):
        raise ValueError(f"{where}: empty path")
    encoder = _beside(manifest, row["path"])
    usage = detected_usage_info(encoder, row.get("usage_info") or usage_info)
    if usage not in USAGE_INFOS:
        raise ValueError(f"{where}: usage_info {usage!r} is not one of {', '.join(USAGE_INFOS)}")
    label = row.get("label") or UNKNOWN
    if label not in (*LABELS, UNKNOWN):
        raise ValueError(f"{where}: label {label!r} is not 'clean' or 'backdoor' (leave it empty when unknown)")
    reference = str(_beside(manifest, row["reference"])) if row.get("reference") else None
    return Encoder(str(encoder), usage, row.get("arch") or arch, label, reference, row.get("reference_text") or None,
                   row.get("family", ""))


def _beside(manifest: Path, cell: str) -> Path:
    """A manifest's path cell: absolute, or relative to the manifest's folder."""
    path = Path(cell).expanduser()
    return path if path.is_absolute() else manifest.parent / path


def find_encoders(manifest=None, patterns=None, root="output", usage_info: str | None = None,
                  arch: str | None = None) -> list[Encoder]:
    """The sweep's encoders, sorted: from a manifest, else from globs, else from the paper's output/ folders."""
    if manifest:
        return read_manifest(manifest, usage_info, arch)
    if patterns:
        return discover_globs(patterns, usage_info, arch)
    return discover_output_folder(root, arch)
