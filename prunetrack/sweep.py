"""Sweeps: a grid of prune jobs from one YAML spec, each cell an MLflow child run.

A spec (see `sweeps/`)::

    name: study-vgg16                  # parent run `sweep-<name>`, tag `sweep` on every cell
    experiment: prunetrack             # where the runs go (default: prunetrack)
    base: {model: vgg16, post_epochs: 160}      # any `prunetrack prune` option, by field name
    grid:                              # axes: every combination is one cell
      pruner: [rand, mag, snip, grasp, synflow]
      compression: [1, 2, 5, 10, 15, 20]
    overrides:                         # fields set on the cells that match `when`
      - when: {pruner: mag}            #   (a value, or a list of values to match any)
        set: {pre_epochs: 200}

Every cell's configuration is built with the same dataclasses as `prunetrack prune`
and validated before anything runs. A cell runs as `python -m prunetrack prune ...` in
its own process (a crash or a kill cannot take the sweep down, and N of them run side
by side), locally or as a Ray task. A cell is skipped when its experiment already holds
a FINISHED run with the same `config_hash`, so running a sweep again after a kill or a
failure runs only what is missing.
"""
from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import yaml

from prunetrack import config, interrupts, servers, tracking
from prunetrack.config import JobConfig

SPEC_KEYS = ("name", "description", "experiment", "base", "grid", "overrides")
EXECUTORS = ("local", "ray")
# Shown in a run's name when they vary; any other varying field is appended as -field=value.
NAME_FIELDS = ("model", "pruner", "compression", "seed")


class SpecError(ValueError):
    """A sweep spec that cannot run; the message names the file and the bad key."""


class SweepFailed(RuntimeError):
    """Some cells failed (the others ran); carries the summary."""

    def __init__(self, summary: "Summary"):
        failed = ", ".join(r.cell.key for r in summary.failed)
        super().__init__(f"{len(summary.failed)} of {len(summary.results)} cells failed: {failed}")
        self.summary = summary


@dataclass
class Cell:
    key: str          # the grid coordinates, e.g. "pruner=mag,compression=10": the `cell` tag
    name: str         # the run name
    config: JobConfig  # resolved, validated
    config_hash: str  # for a pre-training: its pretrain_hash
    kind: str = "prune"             # or "pretrain": the shared pre-training some cells start from
    shared_with: str | None = None  # the key of the cell that computes this one (the dense cell at 1x)


@dataclass
class Spec:
    name: str
    experiment: str
    cells: list[Cell]
    text: str         # the file as written, logged with the parent run

    def plan(self) -> list[Cell]:
        """What runs, in order: the cells (skipping those another cell computes), each
        shared pre-training placed just before the first cell that starts from it."""
        out, seen = [], set()
        for cell in self.cells:
            if cell.shared_with:
                continue
            cfg = cell.config
            if cfg.train.pre_epochs and cfg.pretrain_hash() not in seen:
                seen.add(cfg.pretrain_hash())
                out.append(pretrain_cell(cell))
            out.append(cell)
        return out


def pretrain_cell(cell: Cell) -> Cell:
    cfg, t = cell.config, cell.config.train
    name = f"{cfg.model.model}-pretrain-{t.pre_epochs}ep-s{cfg.run.seed}"
    return Cell(key=f"pretrain:{name}", name=name, config=cfg, config_hash=cfg.pretrain_hash(), kind="pretrain")


@dataclass
class Result:
    cell: Cell
    status: str       # finished | failed | skipped
    seconds: float = 0.0
    run_id: str | None = None  # found by the run's tags once the cell's process ended
    output: str = ""  # the cell process's output (tail), for failures


@dataclass
class Summary:
    name: str
    results: list[Result]
    seconds: float

    def having(self, status: str) -> list[Result]:
        return [r for r in self.results if r.status == status]

    @property
    def failed(self) -> list[Result]:
        return self.having("failed")

    def line(self) -> str:
        shared = len(self.having("shared"))
        return (f"sweep {self.name}: {len(self.results)} cells: {len(self.having('finished'))} finished, "
                f"{len(self.having('skipped'))} skipped (already finished), {len(self.failed)} failed"
                + (f", {shared} computed by another cell" if shared else "") + f" in {_clock(self.seconds)}")


# ---------------------------------------------------------------------------- the spec

def load_spec(path: str) -> Spec:
    """Read and validate a spec: every key, every value, every cell's configuration."""
    try:
        with open(path) as f:
            text = f.read()
        raw = yaml.safe_load(text)
    except OSError as e:
        raise SpecError(f"cannot read sweep spec {path}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None
    try:
        return parse_spec(raw, default_name=os.path.splitext(os.path.basename(path))[0], text=text)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


def parse_spec(raw: Any, default_name: str = "sweep", text: str = "") -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"a sweep spec is a mapping with keys {', '.join(SPEC_KEYS)}; got {type(raw).__name__}")
    for key in raw:
        if key not in SPEC_KEYS:
            raise SpecError(f"unknown key {key!r}{_hint(key, SPEC_KEYS)}; a spec takes: {', '.join(SPEC_KEYS)}")
    name = raw.get("name", default_name)
    experiment = raw.get("experiment", config.RunConfig.experiment)
    for key, value in (("name", name), ("experiment", experiment)):
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{key} must be a non-empty string, got {value!r}")

    base = _values(raw.get("base") or {}, "base")
    grid_raw = raw.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise SpecError(f"grid must map field names to lists of values, got {grid_raw!r}")
    grid: dict[str, list] = {}
    for key, values in grid_raw.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"grid.{key} must be a non-empty list of values, got {values!r}")
        grid[key] = [_values({key: v}, f"grid.{key}")[key] for v in values]

    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list):
        raise SpecError(f"overrides must be a list of {{when: ..., set: ...}} entries, got {overrides!r}")
    rules = []
    for i, rule in enumerate(overrides):
        where = f"overrides[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"when", "set"}:
            raise SpecError(f"{where} must have exactly the keys 'when' and 'set', got {rule!r}")
        if not isinstance(rule["when"], dict) or not rule["when"]:
            raise SpecError(f"{where}.when must map field names to a value or a list of values")
        when = {k: [_values({k: v}, f"{where}.when.{k}")[k] for v in (vs if isinstance(vs, list) else [vs])]
                for k, vs in rule["when"].items()}
        rules.append((when, _values(rule["set"], f"{where}.set")))
    if not grid:  # otherwise the sweep would silently be one job of the base settings
        raise SpecError(f"spec {name!r} has no grid: list at least one axis, e.g. grid: {{seed: [0]}} "
                        f"(a single job is `prunetrack prune`)")

    cells = []
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        values = {**base, **point}
        for when, changes in rules:
            if all(values.get(k, _default(k)) in vs for k, vs in when.items()):
                values.update(changes)
        cells.append(_cell(point, values, experiment))

    seen: dict[str, str] = {}
    for cell in cells:
        if cell.config_hash in seen:
            if cell.config.dense():  # nothing is pruned at 1x: the pruners share one dense network
                cell.shared_with = seen[cell.config_hash]
                continue
            raise SpecError(f"cells {seen[cell.config_hash]} and {cell.key} have the same configuration "
                            f"(a repeated grid value, or an override that undoes an axis)")
        seen[cell.config_hash] = cell.key
    return Spec(name=name, experiment=experiment, cells=cells, text=text)


def _values(mapping: Any, where: str) -> dict[str, Any]:
    """Check that `mapping`'s keys are configuration fields the spec may set, and coerce
    its values to their fields' types."""
    if not isinstance(mapping, dict):
        raise SpecError(f"{where} must map configuration fields to values, got {mapping!r}")
    fields = {f.name: f for f in config.fields()}
    out = {}
    for key, value in mapping.items():
        if key in config.NAMING_FIELDS:
            owner = "the spec's top-level 'experiment'" if key == "experiment" else "the sweep, per cell"
            raise SpecError(f"{where}: {key!r} cannot be set here; it is set by {owner}")
        if key not in fields:
            raise SpecError(f"{where}: unknown configuration key {key!r}{_hint(key, fields)}; "
                            f"see `prunetrack prune --help` for the fields")
        if isinstance(value, (dict, list)) or value is None:
            raise SpecError(f"{where}: {key} takes a single value, got {value!r}")
        try:
            out[key] = config.coerce(fields[key], value)
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None
    return out


def _default(key: str) -> Any:
    for f in config.fields():
        if f.name == key:
            return f.default
    raise KeyError(key)


def _cell(point: dict[str, Any], values: dict[str, Any], experiment: str) -> Cell:
    key = ",".join(f"{k}={_fmt(v)}" for k, v in point.items())
    try:
        cfg = JobConfig.from_flat(values).validate()
    except (ValueError, TypeError) as e:
        raise SpecError(f"cell {key}: {e}") from None
    config.resolve(cfg)
    name = config.default_run_name(cfg)
    name += "".join(f"-{k}={_fmt(v)}" for k, v in point.items() if k not in NAME_FIELDS)
    cfg.run.experiment, cfg.run.run_name = experiment, name
    return Cell(key=key, name=name, config=cfg, config_hash=cfg.config_hash())


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _hint(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------- one cell

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
              on_start: Callable[[Cell, str], None]) -> Iterator[Result]:
    """Run cells `parallel` at a time as subprocesses of this one, each pinned to one GPU
    (round-robin over the visible ones) when there are GPUs; yield results as they end.
    Closing the generator (an error, Ctrl-C, SIGTERM) stops the running cells."""
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

    def work(cell: Cell) -> Result:
        gpu = slots.get()
        try:
            if stopping.is_set():
                return Result(cell, "failed", output="not started: the sweep was stopped")
            env = dict(envs[cell.key])
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            on_start(cell, f"gpu {gpu}" if gpu is not None else "cpu")
            start = time.time()
            try:
                code, output = run_cell_process(
                    cell_command(cell), env, on_line=(lambda line: print("    " + line, end="", flush=True)) if echo
                    else None, started=started)
            except Exception as e:  # the process could not start: this cell fails, the others go on
                return Result(cell, "failed", time.time() - start, output=f"cannot run the cell: {e!r}")
            return Result(cell, "finished" if code == 0 else "failed", time.time() - start, output=output)
        finally:
            slots.put(gpu)

    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="cell")
    try:
        futures = [pool.submit(work, cell) for cell in cells]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # The cells are in sessions of their own: nothing else stops them (SIGTERM to the
        # sweep arrives here as an exception, through interrupts.stoppable).
        with lock:
            stopping.set()
            running = list(live)
        servers.stop(*running)
        pool.shutdown(wait=True, cancel_futures=True)


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
                yield Result(cell, "finished" if code == 0 else "failed", seconds, output=output)
        finally:
            for ref in pending:  # interrupts the task, which stops its cell (KILLED run)
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
    finally:
        if owned:
            ray.shutdown()


# ---------------------------------------------------------------------------- the sweep

def run_sweep(spec: Spec, parallel: int = 1, executor: str = "local", ray_address: str | None = None,
              dry_run: bool = False, echo: Callable[[str], None] | None = None) -> Summary:
    """Run the cells of `spec` that have no FINISHED run yet, under a parent run.

    Returns the summary; raises SweepFailed (after every other cell ran, and after closing
    the parent run as FAILED) when some cell failed.
    """
    echo = echo or (lambda line: print(line, flush=True))
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
    start = time.time()
    tracking.prepare_store()  # before the cells, which would otherwise race to create a new SQLite store
    experiment = spec.experiment
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: cells go next to the sweep's run
        experiment = tracking.experiment_of_run(os.environ["MLFLOW_RUN_ID"])
        for cell in spec.cells:
            cell.config.run.experiment = experiment
    done = tracking.finished_configs(experiment)
    plan = spec.plan()
    todo = [c for c in plan if c.config_hash not in done]
    skipped = [Result(c, "skipped", run_id=done[c.config_hash]) for c in plan if c.config_hash in done]
    shared = [Result(c, "shared") for c in spec.cells if c.shared_with]
    echo(f"sweep {spec.name}: {len(spec.cells)} cells in experiment {experiment!r}: {len(skipped)} already "
         f"finished, {len(shared)} computed by another cell, {len(todo)} to run ({executor}"
         + (f", {parallel} at a time)" if executor == "local" else ")"))
    if dry_run:
        dry_run_table(spec, plan, done, parallel if executor == "local" else 1, echo)
        return Summary(spec.name, skipped + shared + [Result(c, "planned") for c in todo], time.time() - start)

    if executor == "ray" and ray_address and not tracking.tracking_is_remote():
        raise RuntimeError("cells on a Ray cluster need a tracking server every node can reach: "
                           "set MLFLOW_TRACKING_URI to it (http://host:port), not a local store")
    host = socket.gethostname()
    for run_id in tracking.close_stale_sweeps(experiment, spec.name, host, _alive):
        echo(f"closed run {run_id} (KILLED): left RUNNING by an earlier sweep process that died")
    results: list[Result] = list(skipped)
    concurrent = executor == "ray" or (parallel > 1 and len(todo) > 1)
    # The server is entered first and left last: it outlives the cells that log to it. A
    # SIGTERM while it starts stops it too.
    with interrupts.stoppable(), servers.tracking_server(needed=concurrent) as uri, \
            tracking.job_run(experiment, f"sweep-{spec.name}",
                             tags={"sweep": spec.name, "sweep_host": host, "sweep_pid": os.getpid()}) as parent:
        tracking.log_text(spec.text or yaml.safe_dump({"name": spec.name}), "sweep.yaml")
        envs = {c.key: cell_env(c, spec.name, parent.info.run_id, uri) for c in todo}
        progress = _Progress(len(plan), len(skipped), len(todo), start, echo)
        if executor == "local":
            stream = run_local(todo, envs, parallel, progress.started)
        else:
            stream = run_ray(todo, envs, ray_address, progress.started)
        with contextlib.closing(stream):
            for result in stream:
                # The cell's run, by its tags (a resumed run may have been created by an earlier sweep).
                result.run_id = tracking.find_cell_run(
                    experiment, spec.name, parent.info.run_id,
                    "pretrain_hash" if result.cell.kind == "pretrain" else "config_hash", result.cell.config_hash)
                if result.status == "failed" and result.run_id:
                    # A process killed outright (SIGKILL, out of memory) cannot close its own run.
                    tracking.end_if_running(result.run_id, "FAILED", "the cell's process died without closing "
                                            f"its run:\n{result.output[-2000:]}")
                results.append(result)
                progress.finished(result)
        summary = Summary(spec.name, sorted(results, key=lambda r: plan.index(r.cell)) + shared, time.time() - start)
        tracking.log_metrics({f"cells_{s}": len(summary.having(s)) for s in ("finished", "skipped", "failed", "shared")}
                             | {"cells_total": len(spec.cells)})
        tracking.log_table([{"cell": r.cell.key, "run_name": r.cell.name, "status": r.status,
                             "run_id": r.run_id or "", "seconds": round(r.seconds, 1),
                             "config_hash": r.cell.config_hash} for r in summary.results], "cells")
        for r in summary.failed:
            tracking.log_text(r.output, f"failed/{r.cell.name}.log")
        echo(summary.line())
        for r in summary.failed:
            tail = "\n".join("      " + line for line in r.output.rstrip().splitlines()[-8:])
            echo(f"  failed: {r.cell.key} ({r.cell.name}, run {r.run_id or 'not created'}):\n{tail}")
        if summary.failed:
            raise SweepFailed(summary)
    return summary


def dry_run_table(spec: Spec, plan: list[Cell], done: dict[str, str], parallel: int,
                  echo: Callable[[str], None]) -> float:
    """List every cell with its state (finished / partial at epoch k of n / shared / pending)
    and its estimated time on this machine, from a short probe; returns the total seconds."""
    from prunetrack import checkpoint, estimate

    probes: dict[tuple, estimate.Rates] = {}
    pruners = {c.config.prune.pruner for c in plan}
    total = 0.0
    echo(f"  {'cell':36s} {'run name':34s} {'state':30s} {'estimate':>9s}")
    for c in plan:
        cfg = c.config
        if c.config_hash in done:
            state, left = f"finished (run {done[c.config_hash][:8]})", 0.0
        else:
            key = estimate.probe_key(cfg)
            if key not in probes:
                echo(f"  (probing {cfg.model.model} on {cfg.run.device}, batch {cfg.train.batch_size}, "
                     f"{cfg.train.precision} ...)")
                probes[key] = estimate.probe(cfg, pruners)
            ck_key = f"pretrain-{c.config_hash}" if c.kind == "pretrain" else c.config_hash
            saved = checkpoint.peek(cfg.run.checkpoint_dir, ck_key)
            epochs = cfg.train.pre_epochs if c.kind == "pretrain" else cfg.train.post_epochs
            if saved:
                state = f"partial: epoch {saved['epoch']} of {epochs}"
            else:
                state = "pending" + (f" (at most {epochs} epochs)" if c.kind == "pretrain" else "")
            left = estimate.seconds(cfg, probes[key], c.kind, saved["epoch"] if saved else 0)
            total += left
        echo(f"  {c.key:36s} {c.name:34s} {state:30s} {_clock(left):>9s}")
    for c in spec.cells:
        if c.shared_with:
            echo(f"  {c.key:36s} {c.name:34s} {'shared: computed by ' + c.shared_with:30s} {_clock(0):>9s}")
    for key, r in probes.items():
        rounds = ", ".join(f"{p} {s:.2f}s" for p, s in r.prune_round.items())
        echo(f"  probe {key[0]} batch {key[2]} {key[4]}: train {r.train:.0f} img/s, test {r.test:.0f} img/s; "
             f"one pruning round: {rounds}")
    count, size = checkpoint.disk_usage(plan[0].config.run.checkpoint_dir if plan else "")
    echo(f"  checkpoints: {count} saved, {size / 2**20:,.0f} MiB in {checkpoint.root(plan[0].config.run.checkpoint_dir if plan else '')}")
    echo(f"estimated time for what is left: {_clock(total / max(parallel, 1))}"
         + (f" ({parallel} at a time; {_clock(total)} of cell time)" if parallel > 1 else "")
         + "; pre-training counted at its maximum epochs")
    return total


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class _Progress:
    """Progress lines: cells done/total, the cell starting or ending, elapsed time, and the
    time left at the rate cells have been ending so far (which accounts for parallelism)."""

    def __init__(self, total: int, skipped: int, todo: int, start: float, echo):
        self.total, self.done, self.left, self.ran = total, skipped, todo, 0
        self.start, self.first, self.echo = start, None, echo
        self.lock = threading.Lock()

    def started(self, cell: Cell, where: str) -> None:
        with self.lock:
            self.first = self.first or time.time()
            self.echo(f"[{self.done}/{self.total}] start {cell.key} ({cell.name}) on {where} | {self._times()}")

    def finished(self, result: Result) -> None:
        with self.lock:
            self.done, self.left, self.ran = self.done + 1, self.left - 1, self.ran + 1
            run = f", run {result.run_id}" if result.run_id else ""
            self.echo(f"[{self.done}/{self.total}] {result.status} {result.cell.key} in {_clock(result.seconds)}"
                      f"{run} | {self._times()}")

    def _times(self) -> str:
        now = time.time()
        elapsed = now - self.start
        rate = (now - (self.first or now)) / self.ran if self.ran else None  # from the first cell's start
        eta = _clock(rate * self.left) if rate is not None else ("0:00:00" if self.left <= 0 else "?")
        return f"elapsed {_clock(elapsed)}, ETA {eta}"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
