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
import threading
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
    """Hold the exclusive lock on saves to ``target`` inside the block (its parent folder is created).

    Example:
        >>> import pathlib, tempfile
        >>> from lens_laai.errors import SaveError
        >>> from lens_laai.storage.lock import save_lock
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with save_lock(target):  # a second writer to the same folder waits, then gives up with our error
        ...     try:
        ...         with save_lock(target, timeout=0.1):
        ...             pass
        ...     except SaveError as err:
        ...         print(type(err).__name__, "for over 0 s" in str(err))
        SaveError True
    """
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
    """Block in ``flock`` until the lock is ours or ``timeout`` seconds pass (then :class:`SaveError`).

    The kernel queues blocked ``flock`` callers, so a writer saving in a loop cannot starve
    another, which polling with ``LOCK_NB`` would allow. The blocking call runs in a daemon thread
    on a duplicate of ``fd`` (a duplicate shares the open file, and ``flock`` locks belong to the
    open file, so the lock it gets is ``fd``'s), and this thread waits for it with a deadline: no
    signal handler or timer of the caller's is touched, and the deadline holds in any thread. After
    a timeout the waiter stays queued and lets the lock go the moment it gets it.
    """
    waiter = _Waiter(os.dup(fd))
    waiter.start()
    try:
        waiter.done.wait(timeout)
    finally:
        held = waiter.settle()
    if waiter.error is not None:
        raise SaveError(f"Cannot lock {target.parent} for saving: {waiter.error.strerror or waiter.error}.")
    if not held:
        raise _busy(target, timeout)


class _Waiter(threading.Thread):
    """A daemon thread blocked in ``flock(fd, LOCK_EX)``; its duplicate ``fd`` is closed once, by whoever is last."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="lens_laai-save-lock", daemon=True)
        self.fd, self.done = fd, threading.Event()
        self.error: OSError | None = None
        self._mutex, self._abandoned = threading.Lock(), False

    def run(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:
            self.error = err
        with self._mutex:
            if self._abandoned or self.error is not None:
                os.close(self.fd)  # when abandoned, the last reference to the open file: the lock goes
            self.done.set()

    def settle(self) -> bool:
        """True if the caller's ``fd`` now holds the lock; otherwise the waiter drops it whenever it comes."""
        with self._mutex:
            if not self.done.is_set():
                self._abandoned = True
                return False
            if self.error is not None:
                return False
            os.close(self.fd)  # the caller's ``fd`` keeps the open file, and with it the lock
            return True


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
