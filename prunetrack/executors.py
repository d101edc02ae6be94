"""Running a sweep's cells: each one a `python -m prunetrack prune ...` process of its
own (a crash or a kill cannot take the sweep down, and N of them run side by side),
locally or as a Ray task."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from prunetrack import interrupts, servers, tracking
from prunetrack.spec import Cell

EXECUTORS = ("local", "ray")


@dataclass
class Result:
    cell: Cell
    status: str       # finished | failed | stopped (time limit) | skipped | shared | later | planned (--dry-run)
    seconds: float = 0.0
    run_id: str | None = None  # found by the run's tags once the cell's process ended
    output: str = ""  # the cell process's output (tail), for failures


def status_of(code: int) -> str:
    """A cell's status from its process's exit code."""
    if code == 0:
        return "finished"
    return "stopped" if code == interrupts.EXIT_TIME_UP else "failed"


def cell_command(cell: Cell) -> list[str]:
    """The `prune` (or `pretrain`) command line of a cell: every field explicit, so the
    child computes exactly the configuration (and config_hash) the sweep planned."""
    args = [sys.executable, "-m", "prunetrack", cell.kind]
    for key, value in cell.config.flat().items():
        args += ["--" + key.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def cell_env(cell: Cell, sweep: str, parent_run_id: str, tracking_uri: str) -> dict[str, str]:
    """Environment variables a cell's process needs on top of the sweep's own."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "MLFLOW_TRACKING_URI": tracking_uri,
        # Set on the cell's run (and on a pre-training it starts) as the run is created: the
        # sweep finds the run by them (tracking.find_cell_run) once the process has ended.
        tracking.RUN_TAGS_ENV: json.dumps({"mlflow.parentRunId": parent_run_id, "sweep": sweep,
                                           "cell": cell.key}),
        # The child imports the same prunetrack as the sweep (a checkout, not only an install).
        "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p),
    }


def run_cell_process(command: list[str], env: dict[str, str], on_line: Callable[[str], None] | None = None,
                     started: Callable[[subprocess.Popen], bool] | None = None) -> tuple[int, str]:
    """Run one cell's process to the end; returns (exit code, output tail). The sweep
    finds the cell's run afterwards by its tags (tracking.find_cell_run).

    The process gets a session of its own: a Ctrl-C in the terminal reaches only the
    sweep, which stops its cells before the tracking server they log to. `started` is
    told the process (and may refuse it, returning False, when the sweep is stopping). If
    this thread is interrupted (Ray cancelling the task), the process gets SIGTERM, which
    its job turns into a KILLED run, before the interruption goes on. If this process is
    killed outright, the cell notices within a second (PRUNETRACK_PARENT_PID) and stops.
    """
    full_env = {**os.environ, **env, interrupts.PARENT_PID_ENV: str(os.getpid())}
    # A sweep under `mlflow run` has these for its own run; a cell must open a new one.
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        full_env.pop(var, None)
    proc = subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    if started is not None and not started(proc):
        servers.stop(proc)
        return -15, ""
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    except BaseException:
        servers.stop(proc)
        raise
    return code, "".join(lines)[-6000:]


# ---------------------------------------------------------------------------- executors

def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(cells: list[Cell], envs: dict[str, dict[str, str]], parallel: int,
              on_start: Callable[[Cell, str], None],
              may_start: Callable[[Cell], bool] | None = None) -> Iterator[Result]:
    """Run cells `parallel` at a time as subprocesses of this one, each pinned to one GPU
    (round-robin over the visible ones) when there are GPUs; yield results as they end.
    A cell that `may_start` refuses when its turn comes (the time limit is too near) is
    yielded as `later`, not run.
    A cell's slot is free for the next cell only once the caller has taken its result, so
    that a cell's end is recorded (and said) before the cell after it starts. Closing the
    generator (an error, Ctrl-C, SIGTERM) stops the running cells."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    gpus = _visible_gpus()
    slots: queue.Queue = queue.Queue()
    for i in range(parallel):
        slots.put(gpus[i % len(gpus)] if gpus else None)
    lock, stopping, live = threading.Lock(), threading.Event(), set()
    echo = parallel == 1  # one cell at a time: its output can go straight to the console

    def started(proc):
        with lock:
            if stopping.is_set():
                return False
            live.add(proc)
            return True

    def work(cell: Cell) -> tuple[Result, str | None]:
        gpu = slots.get()  # returned by the loop below, once the result is taken
        try:
            if stopping.is_set():
                return Result(cell, "failed", output="not started: the sweep was stopped"), gpu
            if may_start is not None and not may_start(cell):
                return Result(cell, "later"), gpu
            env = dict(envs[cell.key])
            # A cell that names its GPU (device cuda:N) sees the GPUs the sweep sees: pinned
            # to one, its cuda:N would be another GPU or none.
            pinned = gpu is not None and not cell.config.run.device.startswith("cuda:")
            if pinned:
                env["CUDA_VISIBLE_DEVICES"] = gpu
                on_start(cell, f"gpu {gpu}")
            else:
                on_start(cell, "cpu" if gpu is None else cell.config.run.device)
            start = time.time()
            try:
                code, output = run_cell_process(
                    cell_command(cell), env, on_line=(lambda line: print("    " + line, end="", flush=True)) if echo
                    else None, started=started)
            except Exception as e:  # the process could not start: this cell fails, the others go on
                return Result(cell, "failed", time.time() - start, output=f"cannot run the cell: {e!r}"), gpu
            return Result(cell, status_of(code), time.time() - start, output=output), gpu
        except BaseException:
            slots.put(gpu)
            raise

    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cell")
    try:
        futures = [pool.submit(work, cell) for cell in cells]
        for future in as_completed(futures):
            result, gpu = future.result()
            yield result
            slots.put(gpu)
    finally:
        # The cells are in sessions of their own: nothing else stops them (SIGTERM to the
        # sweep arrives here as an exception, through interrupts.stoppable).
        with lock:
            stopping.set()
            running = list(live)
        # Cells not begun are cancelled first, so that no worker takes one while the running
        # cells stop; a worker that took one already waits for a slot: wake it (one per
        # worker), and it sees the sweep stopping.
        pool.shutdown(wait=False, cancel_futures=True)
        for _ in range(parallel):
            slots.put(None)
        servers.stop(*running)
        pool.shutdown(wait=True)


def _ray_cell(command: list[str], env: dict[str, str]) -> tuple[int, str, float]:
    """The body of one Ray task: the cell's process on whichever node Ray chose, with the
    GPU Ray assigned (Ray sets CUDA_VISIBLE_DEVICES for the task)."""
    start = time.time()
    # The driver's interpreter path may not exist on a cluster node; the worker's does.
    code, output = run_cell_process([sys.executable, *command[1:]], env)
    return code, output, time.time() - start


def run_ray(cells: list[Cell], envs: dict[str, dict[str, str]], address: str | None,
            on_start: Callable[[Cell, str], None]) -> Iterator[Result]:
    """Run every cell as a Ray task asking for one GPU (none when the cluster has none);
    yield results as they end. Connects to `address` (or RAY_ADDRESS), else starts a local
    Ray instance, unless this process already called `ray.init`."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("the ray executor needs Ray: pip install 'prunetrack[ray]'") from None
    owned = not ray.is_initialized()
    if owned:
        ray.init(address=address, log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=0)(_ray_cell)
        pending = {}
        for cell in cells:
            # Cells start when Ray has room; they are announced as submitted.
            on_start(cell, "a ray task (queued" + (", 1 GPU)" if gpus else ")"))
            # The driver's PYTHONPATH points into this machine; on a cluster the workers
            # import prunetrack from their install or the job's runtime_env working_dir.
            env = {k: v for k, v in envs[cell.key].items() if k != "PYTHONPATH" or not address}
            pending[task.remote(cell_command(cell), env)] = cell
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                cell = pending.pop(ready[0])
                try:
                    code, output, seconds = ray.get(ready[0])
                except Exception as e:  # the task itself died (node lost, worker killed)
                    yield Result(cell, "failed", output=f"ray task failed: {e}")
                    continue
                yield Result(cell, status_of(code), seconds, output=output)
        finally:
            for ref in pending:  # interrupts the task, which stops its cell (KILLED run)
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
    finally:
        if owned:
            ray.shutdown()
