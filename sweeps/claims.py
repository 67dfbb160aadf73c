"""Claims: before running an encoder a sweep creates `trigger_norm/claims/<run_id>.claim` exclusively, so two
sweeps on one --out_dir never run the same encoder at once; a claim whose owner is provably gone is taken over."""
import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

CLAIM_GRACE = 60  # seconds past its owner's timeout after which a claim is stale wherever its owner runs


def claims_dir(out_dir) -> Path:
    return Path(out_dir) / "trigger_norm" / "claims"


def claim_path(out_dir, run_id: str) -> Path:
    return claims_dir(out_dir) / f"{run_id}.claim"


@contextlib.contextmanager
def _claims_locked(out_dir):
    """Serialise claiming between the sweeps of this host, so a stale claim is taken over by one of them only.

    The lock is on the claims folder itself (no lock file left behind) and the kernel drops it if its holder
    dies; where the filesystem has no such locks, claims stay exclusive through O_EXCL and only the take-over
    of a stale claim is unguarded."""
    folder = claims_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_claim(path: Path) -> dict:
    """A claim's record; one that cannot be read counts as made when the file was."""
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict):
            return record
    except (OSError, ValueError):
        pass
    try:
        return {"started": path.stat().st_mtime}
    except FileNotFoundError:
        return {}


def _create_claim(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists (then False). Readers hold the lock too, so on one host
    nobody sees it half-written; elsewhere a half-written claim reads as just made (read_claim)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        path.unlink(missing_ok=True)  # an empty claim would hold the encoder until its timeout
        raise
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a zombie has exited; only its parent has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def claim_is_stale(holder: dict, timeout: float) -> bool:
    """The holder is provably gone: it ran on this host and its pid is not alive, or its time is long up."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        return True
    return time.time() - holder.get("started", 0) > holder.get("timeout", timeout) + CLAIM_GRACE


def claim_encoder(out_dir, run_id: str, timeout: float) -> tuple[bool, dict]:
    """Claim an encoder for this process: (True, our record) or (False, the live holder's record)."""
    path = claim_path(out_dir, run_id)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "timeout": timeout, "token": uuid.uuid4().hex}
    data = json.dumps(mine).encode()
    with _claims_locked(out_dir):
        if _create_claim(path, data):
            return True, mine
        holder = read_claim(path)
        if not claim_is_stale(holder, timeout):
            return False, holder
        path.unlink(missing_ok=True)
        return (True, mine) if _create_claim(path, data) else (False, read_claim(path))


def release_claim(out_dir, run_id: str, mine: dict) -> None:
    """Remove our claim, unless another sweep has taken it over (after our timeout)."""
    path = claim_path(out_dir, run_id)
    with _claims_locked(out_dir):
        if read_claim(path).get("token") == mine["token"]:
            path.unlink(missing_ok=True)
