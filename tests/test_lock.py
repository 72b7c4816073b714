"""The save lock's deadline: it leaves the caller's signals and timers alone, works in any thread, and leaks nothing."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from lens_laai.errors import SaveError
from lens_laai.storage.lock import save_lock

fcntl = pytest.importorskip("fcntl")


@contextmanager
def held(folder: Path):
    """Another holder of the lock on saves into ``folder`` (a separate open file conflicts as another process would)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield fd
    finally:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_timeout_leaves_the_callers_alarm_handler_and_timer_running(tmp_path):
    """A caller's SIGALRM timer keeps counting down (and keeps its interval) while a save waits for the lock."""
    fired = []

    def handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0, 7.0)
        with held(tmp_path), pytest.raises(SaveError, match="saving into"):
            with save_lock(tmp_path / "run", timeout=0.5):
                pass
        remaining, interval = signal.getitimer(signal.ITIMER_REAL)
        after = signal.getsignal(signal.SIGALRM)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert after is handler and not fired
    assert interval == pytest.approx(7.0)
    assert 25.0 < remaining <= 29.5, remaining  # half a second (and a little) went by


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_callers_alarm_fires_on_time_during_a_wait(tmp_path):
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(time.monotonic()))
    try:
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with held(tmp_path), pytest.raises(SaveError):
            with save_lock(tmp_path / "run", timeout=0.6):
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(fired) == 1 and fired[0] - start < 0.5, fired


def test_timeout_holds_in_a_worker_thread(tmp_path):
    """Outside the main thread the wait used to have no deadline at all."""
    outcome = []

    def save() -> None:
        try:
            with save_lock(tmp_path / "run", timeout=0.3):
                outcome.append("locked")
        except SaveError as err:
            outcome.append(err)

    with held(tmp_path):
        worker = threading.Thread(target=save, daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), "the save waited past its deadline"
    assert len(outcome) == 1 and isinstance(outcome[0], SaveError), outcome


def test_a_waiter_gets_the_lock_when_the_holder_lets_go(tmp_path):
    release = threading.Timer(0.3, lambda: os.close(holder))
    holder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    release.start()
    start = time.monotonic()
    with save_lock(tmp_path / "run", timeout=10):
        waited = time.monotonic() - start
        probe = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(BlockingIOError):  # we hold it now
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    release.join()
    assert 0.2 < waited < 5, waited


def test_a_timed_out_waiter_lets_the_lock_go_and_leaks_no_descriptor(tmp_path):
    before = open_fds()
    with held(tmp_path):
        for _ in range(3):
            with pytest.raises(SaveError):
                with save_lock(tmp_path / "run", timeout=0.1):
                    pass
    with save_lock(tmp_path / "run", timeout=5):  # the abandoned waiters took the lock in turn and dropped it
        pass
    deadline = time.monotonic() + 5
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open_fds() == before
    assert not [t for t in threading.enumerate() if t.name == "lens_laai-save-lock"]
