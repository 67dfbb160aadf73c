"""Signals a long-running script reacts to."""
import signal


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, Slurm's scancel or time limit) like Ctrl-C, so running children are ended too."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
