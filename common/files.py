"""Files named by strangers: discovery that stays inside its tree, special files refused, names printed safely.

A downloaded folder may hold symlinks (`x -> ..` loops forever under a recursive glob, `y -> /elsewhere` pulls
in other people's files), device and /proc files (endless or failing reads), and names with control characters
(a newline in a name forges a line of console output). Everything here treats a name as data.
"""
import fnmatch
import os
import stat
from pathlib import Path

# the kernel's views of processes and devices: regular files there report size 0 and read differently each time
SPECIAL_TREES = ("/proc", "/sys", "/dev")


class SpecialFileError(ValueError):
    """A path that is not a regular file of data (a device, pipe, socket or /proc entry)."""


def printable(name) -> str:
    """`name` with control and other non-printable characters escaped (\\n, \\x1b, \\u2028), so it stays on
    one line and cannot forge console output."""
    text = str(name)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a symlink loop
        return False


def walk_files(root):
    """Every file under `root` (Path, sorted), never entering symlinked folders; a symlinked file counts only when
    it resolves inside `root`, so discovery neither loops nor leaves the tree."""
    root = Path(root)
    real_root = root.resolve()
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if not path.is_symlink() or _inside(path, real_root):
                yield path


def _has_magic(part: str) -> bool:
    return any(c in part for c in "*?[")


def _component_matches(name: str, pattern: str) -> bool:
    """fnmatch on one path component; a leading '.' is matched only by a pattern that starts with it (as glob)."""
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _parts_match(parts: tuple, patterns: tuple) -> bool:
    """Path components against pattern components; '**' stands for any number of components, none included."""
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_parts_match(parts[i:], patterns[1:]) for i in range(len(parts) + 1)
                   if all(not p.startswith(".") for p in parts[:i]))
    return bool(parts) and _component_matches(parts[0], patterns[0]) and _parts_match(parts[1:], patterns[1:])


def safe_glob(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True) without its dangers: the files and folders under the pattern's fixed
    leading folder that match it, found by walk_files' rules (symlinked folders never entered, links that leave
    the tree never followed); sorted."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _has_magic(part)), len(parts))
    if fixed == len(parts):  # no wildcard: the path itself
        return [pattern] if os.path.exists(pattern) else []
    base = Path(*parts[:fixed]) if fixed else Path(".")
    if not base.is_dir():
        return []
    real_base, rest, found = base.resolve(), tuple(parts[fixed:]), []
    for folder, dirs, files in os.walk(base, followlinks=False):
        rel_folder = Path(folder).relative_to(base).parts
        for name in dirs + files:
            path = Path(folder) / name
            if _parts_match(rel_folder + (name,), rest) and (not path.is_symlink() or _inside(path, real_base)):
                found.append(str(path))
    return sorted(found)


def check_regular(path, what: str = "file") -> int:
    """The size of `path`, a regular file of data (after symlinks); a device, pipe, socket, folder or /proc, /sys
    or /dev entry is refused with SpecialFileError naming it."""
    path = Path(path)
    try:
        info = os.stat(path)
        real = path.resolve()
    except OSError as err:
        raise SpecialFileError(f"{printable(path)}: cannot read this {what} ({err.strerror or err}); "
                               "check the path and its permissions") from None
    special = any(real == Path(tree) or Path(tree) in real.parents for tree in SPECIAL_TREES)
    if not stat.S_ISREG(info.st_mode) or special:
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, pipe, socket or kernel file"
        raise SpecialFileError(f"{printable(path)}: not a regular file ({printable(real)} is {kind}); point to "
                               f"the {what} itself")
    return info.st_size


def read_bounded(path, limit: int, what: str = "file") -> bytes:
    """A regular file's bytes, at most `limit` of them (SpecialFileError beyond, or for a special file)."""
    check_regular(path, what)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise SpecialFileError(f"{printable(path)}: cannot read this {what} ({err.strerror or err}); "
                               "check the file") from None
    if len(data) > limit:
        raise SpecialFileError(f"{printable(path)}: more than {limit} bytes is too large for a {what}; use the "
                               f"{what} that came with the weights")
    return data
