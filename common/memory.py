"""Memory: a per-process address-space limit for sweep workers, and recognising out-of-memory errors.

Whatever a hostile file still manages to allocate should cost its own encoder's run, recorded as failed with
the reason, not the machine: a CPU worker runs under RLIMIT_AS (`--max_memory` on top of what the process has
mapped when it starts: torch's libraries). CUDA reserves far more address space than it uses, so GPU workers
run without it.
"""
import os
import re

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_MEMORY = 1 << 30  # below this torch alone does not start


def parse_size(text: str) -> int:
    """'16G', '512M', '2.5T' or bytes -> bytes (argparse type; at least MIN_MEMORY, 0 = no limit)."""
    import argparse
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.I)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 16G, 512M or 0 (no limit)")
    value = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if 0 < value < MIN_MEMORY:
        raise argparse.ArgumentTypeError(f"{text} is below the {MIN_MEMORY >> 30} GiB a run needs; give more, "
                                         "or 0 for no limit")
    return value


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def default_max_memory(workers: int) -> int:
    """Each of `workers` CPU workers' share of the machine's memory, at least MIN_MEMORY (0: unknown, no limit)."""
    total = physical_memory()
    return max(MIN_MEMORY, total // max(1, workers)) if total else 0


def mapped_bytes() -> int:
    """This process's address space now (VmSize): torch's libraries alone map a few GiB they never touch."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def limit_address_space(nbytes: int) -> None:
    """Let this process map at most `nbytes` more than it has mapped now (Linux RLIMIT_AS; 0, or a system
    without it: no limit)."""
    try:
        import resource
    except ImportError:
        return
    if nbytes > 0:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = mapped_bytes() + nbytes
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


# how torch reports a failed allocation: a RuntimeError (CPU), torch.OutOfMemoryError (CUDA, a RuntimeError)
_OOM_TEXT = re.compile(r"out of memory|not enough memory|can't allocate memory|cannot allocate memory", re.I)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and (type(err).__name__ == "OutOfMemoryError" or
                                              bool(_OOM_TEXT.search(str(err).split("\n", 1)[0])))
