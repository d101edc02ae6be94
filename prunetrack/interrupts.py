"""How a job learns that it must stop: Ctrl-C, SIGTERM, the death of the process that
started it (a sweep, or `mlflow run`), or its time limit. All four arrive in the main thread
as a KeyboardInterrupt subclass, so that one `except KeyboardInterrupt` closes the run as
KILLED and keeps the checkpoint (tracking.job_run).
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


class ParentDied(KeyboardInterrupt):
    """The process that started this job is gone (a sweep killed with SIGKILL, `mlflow run`
    terminated): nobody is left to stop the job or to close its run, so it stops itself."""


class TimeUp(KeyboardInterrupt):
    """The next epoch would not end before the time limit (`--time-limit`): the job stops
    at the checkpoint it just saved, and exits with EXIT_TIME_UP."""


# The Unix time by which a job must have stopped, its last epoch saved: set by `--time-limit`
# (a sweep passes its own to its cells through the environment).
DEADLINE_ENV = "PRUNETRACK_DEADLINE"
# A job stopped by its time limit exits with this (EX_TEMPFAIL: try again later); a sweep
# reads it as "stopped, resumable", not as a failure.
EXIT_TIME_UP = 75


_deadline: float | None = None  # set by time_limited, inside this process


def deadline() -> float | None:
    """The time limit of this process (Unix time): its own `time_limited` block's, else the
    one its parent passed in the environment, else None."""
    if _deadline is not None:
        return _deadline
    value = os.environ.get(DEADLINE_ENV)
    return float(value) if value else None


@contextlib.contextmanager
def time_limited(seconds: float | None):
    """While the block runs, the time limit is `seconds` from its start (None: no change)."""
    global _deadline
    previous = _deadline
    if seconds is not None:
        _deadline = time.time() + seconds
    try:
        yield
    finally:
        _deadline = previous


def seconds_left() -> float | None:
    """Seconds until the time limit (negative once it has passed), or None without one."""
    when = deadline()
    return None if when is None else when - time.time()


def time_left(estimate: float | None) -> bool:
    """Whether work expected to take `estimate` seconds (None: unknown, counted as 0) ends
    before the time limit; always True without one."""
    left = seconds_left()
    return left is None or (estimate or 0.0) <= left


# The pid of the process that started this job (a sweep sets it for its cells). A cell
# runs in a session of its own, so a sweep killed outright takes nothing with it.
PARENT_PID_ENV = "PRUNETRACK_PARENT_PID"


def _is_mlflow_run(pid: int) -> bool:
    """Whether `pid` runs `mlflow run` (Linux /proc; False where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return "run" in args and any(os.path.basename(a) == "mlflow" for a in args)


@functools.cache
def watched_parent() -> tuple[int, str] | None:
    """(pid, what) of the parent whose death stops this job, or None. Decided once per
    process: once the parent has died, getppid() names another process. `mlflow run` execs
    the entry point's command, so the job's parent is the `mlflow run` process: when that
    one is SIGTERMed it exits at once and leaves its run RUNNING and the trainer alone."""
    if os.environ.get(PARENT_PID_ENV):
        return int(os.environ[PARENT_PID_ENV]), "the sweep process"
    if _is_mlflow_run(os.getppid()):
        return os.getppid(), "the `mlflow run` process"
    return None


def parent_died() -> bool:
    """Whether the watched parent has exited. An orphan is re-parented at once, so its
    parent pid changes: unlike kill(pid, 0), neither a dead parent not yet reaped (a
    zombie) nor a reused pid can fool this."""
    watched = watched_parent()
    return watched is not None and os.getppid() != watched[0]


def parent_died_message() -> str:
    pid, what = watched_parent()
    return f"{what} (pid {pid}) died; the checkpoint is kept: run the same command again to resume"


def cause(e: BaseException) -> str:
    """What interrupted the job, for the run's `interrupted` tag."""
    if isinstance(e, ParentDied):
        return "parent-died"
    if isinstance(e, TimeUp):
        return "time-limit"
    return "SIGTERM" if isinstance(e, Terminated) else "SIGINT"


_parent_gone = threading.Event()
_watching = threading.Event()  # set while a watcher may still send its signal
_lock = threading.Lock()  # a watcher sends its signal only while it holds this and _watching is set
_stopping = threading.Event()  # the first stop signal has been raised


def _raise(signum, frame):
    # One stop per block: a second signal is the same request (`mlflow run` SIGTERMs its
    # entry point right after the terminal's Ctrl-C), and raising it again would interrupt
    # the unwinding of the first, e.g. a database session's rollback, which then keeps
    # the SQLite store locked while the run is being closed.
    if _stopping.is_set():
        return
    _stopping.set()
    if _parent_gone.is_set():
        raise ParentDied(parent_died_message())
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(f"terminated by signal {signum}")


def _watch(interval: float, main: int) -> None:
    while _watching.is_set():
        time.sleep(interval)
        with _lock:
            if _watching.is_set() and parent_died():
                _watching.clear()
                _parent_gone.set()
                # A real SIGTERM to the main thread: unlike _thread.interrupt_main it also
                # wakes a blocking call (a sleep, a wait); our handler raises ParentDied.
                signal.pthread_kill(main, signal.SIGTERM)


@contextlib.contextmanager
def stoppable(interval: float = 0.5):
    """While the block runs (in the main thread), Ctrl-C raises KeyboardInterrupt, SIGTERM
    Terminated and the death of the watched parent ParentDied, once: later signals are
    ignored while `finally` blocks close runs and stop child processes. Outside the main
    thread it does nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _raise:
        yield  # not ours to handle, or an enclosing block already does (a job inside a sweep's block)
        return
    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    _stopping.clear()
    _parent_gone.clear()
    if watched_parent() is not None:
        _watching.set()
        threading.Thread(target=_watch, args=(interval, threading.main_thread().ident), name="parent-watch",
                         daemon=True).start()
    try:
        yield
    finally:
        with _lock:  # the watcher sends nothing from here on
            _watching.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def closing():
    """While a run is being closed nothing interrupts it: the parent watcher stops, and
    Ctrl-C and SIGTERM are ignored (`mlflow run`, on Ctrl-C, SIGTERMs its entry point
    while that closes its run). A signal that arrived before the block and is not yet
    handled is dropped too (Python skips a pending signal whose handler is now SIG_IGN,
    printing that it did)."""
    with _lock:
        _watching.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
