"""One writer at a time per save path: an inter-process lock held while a save is written.

Two processes saving to the same directory at once used to interleave their renames and
deletions and leave only a manifest. :func:`save_lock` serialises them. On POSIX it is
``fcntl.flock`` on the save's *parent directory*: no lock file is left in the user's folder, the
kernel drops the lock when a writer dies (even by SIGKILL), and it needs no new dependency; the
price is that saves into one folder take turns, which costs milliseconds. Where ``fcntl`` does not
exist (Windows) it is ``filelock`` on a hidden sibling file, ``.NAME.lens_laai-lock``. Both time
out with an error rather than hang behind a stuck writer.

Readers take no lock (a shared save may be read-only to them):
:func:`lens_laai.storage.bundle.load_bundle` reads what the manifest it opened names, and starts
again when a writer replaced the manifest meanwhile.

Example:
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with save_lock(target):
    ...     pass
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lens_laai.errors import SaveError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_TAG = ".lens_laai-lock"
LOCK_TIMEOUT_S = 120.0


@contextmanager
def save_lock(target: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the exclusive lock on saves to ``target`` inside the block (its parent folder is created)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _flock(target, timeout) if fcntl is not None else _filelock(target, timeout):
        yield


@contextmanager
def _flock(target: Path, timeout: float) -> Iterator[None]:
    fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _wait(fd, target, timeout)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _wait(fd: int, target: Path, timeout: float) -> None:
    """Block in ``flock`` (the kernel queues waiters, so a writer in a loop cannot starve another), with a deadline."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        fcntl.flock(fd, fcntl.LOCK_EX)  # signals only reach the main thread: wait without a deadline
        return

    def expire(signum: int, frame: object) -> None:
        raise _busy(target, timeout)

    previous = signal.signal(signal.SIGALRM, expire)
    remaining = signal.setitimer(signal.ITIMER_REAL, timeout)[0]
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, remaining)


@contextmanager
def _filelock(target: Path, timeout: float) -> Iterator[None]:  # pragma: no cover - Windows
    from filelock import FileLock, Timeout

    lock = FileLock(target.with_name(f".{target.name}{LOCK_TAG}"), timeout=timeout, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise _busy(target, timeout) from None
    try:
        yield
    finally:
        lock.release()


def _busy(target: Path, timeout: float) -> SaveError:
    return SaveError(
        f"Another process has been saving into {target.parent} for over {timeout:.0f} s; "
        "wait for it to finish, or save to another path."
    )
