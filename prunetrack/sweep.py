"""Sweeps: a grid of prune jobs from one YAML spec (prunetrack.spec), each cell an
MLflow child run of a parent run `sweep-<name>`.

A cell runs in a process of its own (prunetrack.executors). It is skipped when its
experiment already holds a FINISHED run with the same `config_hash`, so running a sweep
again after a kill or a failure runs only what is missing; a cell interrupted part-way
resumes from its checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import yaml

from prunetrack import interrupts, servers, store, tracking
from prunetrack.executors import EXECUTORS, Result, cell_env, run_local, run_ray
from prunetrack.progress import clock, join_words, plural
from prunetrack.spec import Cell, Spec


class SweepFailed(RuntimeError):
    """Some cells failed (the others ran); carries the summary."""

    def __init__(self, summary: "Summary"):
        failed = ", ".join(r.cell.key for r in summary.failed)
        super().__init__(f"{len(summary.failed)} of {len(summary.results)} cells failed: {failed}")
        self.summary = summary


@dataclass
class Summary:
    name: str
    results: list[Result]
    seconds: float
    later_by: str = "--max-cells"  # the option that left cells for a later run

    def having(self, status: str) -> list[Result]:
        return [r for r in self.results if r.status == status]

    @property
    def failed(self) -> list[Result]:
        return self.having("failed")

    def line(self) -> str:
        shared, later, stopped = len(self.having("shared")), len(self.having("later")), len(self.having("stopped"))
        return (f"sweep {self.name}: {plural(len(self.results), 'cell')}: {len(self.having('finished'))} finished, "
                f"{len(self.having('skipped'))} skipped (already finished), {len(self.failed)} failed"
                + (f", {shared} computed by another cell" if shared else "")
                + (f", {stopped} stopped at the time limit (resumes from its checkpoint)" if stopped else "")
                + (f", {later} left for a later run ({self.later_by})" if later else "") + f" in {clock(self.seconds)}")


class PrecisionChange(RuntimeError):
    """The cells left would train in another precision than the finished ones."""


# ---------------------------------------------------------------------------- the sweep

def run_sweep(spec: Spec, parallel: int = 1, executor: str = "local", ray_address: str | None = None,
              dry_run: bool = False, echo: Callable[[str], None] | None = None,
              allow_precision_change: bool = False, max_cells: int | None = None,
              time_limit: float | None = None) -> Summary:
    """Run the cells of `spec` that have no FINISHED run yet, under a parent run; with
    `max_cells`, only the first that many of them (in the plan's order), leaving the rest
    for a later run: a piece of a long sweep sized to the time at hand. With `time_limit`
    (seconds), stop by then: each cell stops at its last checkpoint before the limit (it
    is passed to them), and a cell that could not save its first epoch in time (by the
    estimates of earlier runs here) is not started but left for a later run.

    Returns the summary; raises SweepFailed (after every other cell ran, and after closing
    the parent run as FAILED) when some cell failed, and PrecisionChange (before any cell
    runs) when this machine would train the cells left in another precision than the
    finished ones, unless `allow_precision_change`.
    """
    echo = echo or (lambda line: print(line, flush=True))
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if max_cells is not None and max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    if time_limit is not None and time_limit <= 0:
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit}")
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
    start = time.time()
    deadline = start + time_limit if time_limit else None
    store.prepare_store()  # before the cells, which would otherwise race to create a new SQLite store
    experiment = spec.experiment
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: cells go next to the sweep's run
        experiment = tracking.experiment_of_run(os.environ["MLFLOW_RUN_ID"])
        for cell in spec.cells:
            cell.config.run.experiment = experiment
    done = tracking.finished_configs(experiment)
    plan = spec.plan(done)
    todo = [c for c in plan if c.config_hash not in done]
    skipped = [Result(c, "skipped", run_id=done[c.config_hash]) for c in plan if c.config_hash in done]
    shared = [Result(c, "shared") for c in spec.cells if c.shared_with]
    echo(f"sweep {spec.name}: {plural(len(spec.cells), 'cell')} in experiment {experiment!r}: {len(skipped)} already "
         f"finished, {len(shared)} computed by another cell, {len(todo)} to run ({executor}"
         + (f", {parallel} at a time)" if executor == "local" else ")"))
    changed = precision_change(plan, done, todo)
    if changed and not (dry_run or allow_precision_change):
        raise PrecisionChange(changed + "; pass --allow-precision-change to train them anyway")
    if changed:
        echo("WARNING: " + changed + ("" if allow_precision_change else
                                      "; the sweep will refuse to run them without --allow-precision-change"))
    if dry_run:
        dry_run_table(spec, plan, done, parallel if executor == "local" else 1, echo, experiment, time_limit)
        return Summary(spec.name, skipped + shared + [Result(c, "planned") for c in todo], time.time() - start)
    later = [Result(c, "later") for c in todo[max_cells:]] if max_cells is not None else []
    if later:
        todo = todo[:max_cells]
        echo(f"running the first {plural(len(todo), 'cell')} left (--max-cells {max_cells}); "
             f"{len(later)} left for a later run")

    if executor == "ray" and ray_address and not store.tracking_is_remote():
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
        about = spec.description + "\n\n" if spec.description else ""
        tracking.describe(f"{about}Sweep {spec.name}: {len(todo)} of {plural(len(plan), 'cell')} to run as it started "
                          f"({len(skipped)} finished before).")
        envs = {c.key: cell_env(c, spec.name, parent.info.run_id, uri) for c in todo}
        estimator = _estimator(todo, experiment)
        may_start = None
        if deadline is not None:
            for env in envs.values():
                env[interrupts.DEADLINE_ENV] = repr(deadline)
            may_start = _in_time(estimator, deadline, results)
            echo(f"time limit {clock(time_limit)}: cells stop at their last checkpoint before "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(deadline))}, and a cell that could not "
                 "save its first epoch by then is left for a later run")
        progress = _Progress(len(plan), len(skipped), len(todo), start, echo,
                             _estimates(todo, estimator), parallel if executor == "local" else 1, deadline)
        if executor == "local":
            stream = run_local(todo, envs, parallel, progress.started, may_start)
        else:
            stream = run_ray(todo, envs, ray_address, progress.started)
        with _close_cells_left_running(experiment, parent.info.run_id, spec.name, results, echo), \
                contextlib.closing(stream):
            for result in stream:
                if result.status == "later":  # not started: the time limit was too near (said below, at once)
                    results.append(result)
                    continue
                # The cell's run, by its tags (a resumed run may have been created by an earlier sweep).
                result.run_id = tracking.find_cell_run(
                    experiment, spec.name, parent.info.run_id,
                    "pretrain_hash" if result.cell.kind == "pretrain" else "config_hash", result.cell.config_hash)
                if result.status == "failed" and result.run_id:
                    # A process killed outright (SIGKILL, out of memory) cannot close its own run.
                    tracking.end_if_running(result.run_id, "FAILED", "the cell's process died without closing "
                                            f"its run:\n{result.output[-2000:]}")
                results.append(result)
                if result.status == "finished" and progress.estimates is None:
                    # A cell finished here has timed this machine: the cells left that had no
                    # estimate (no earlier run of their training on this kind of device) may
                    # have one now, for the ETA and the time limit.
                    estimator.refresh(tracking.speed_records(experiment))
                    ran = {r.cell.key for r in results}
                    progress.estimates = _estimates([c for c in todo if c.key not in ran], estimator)
                progress.finished(result)
        unstarted = [r.cell for r in results if r.status == "later"]
        if unstarted:
            shown = ", ".join(f"{c.key} ({c.name})" for c in unstarted[:3])
            echo(f"time limit: {plural(len(unstarted), 'cell')} not started, as {'its' if len(unstarted) == 1 else 'their'}"
                 f" first epoch would not be saved in time: {shown}"
                 + (f", … {len(unstarted) - 3} more" if len(unstarted) > 3 else ""))
        summary = Summary(spec.name, sorted(results + later, key=lambda r: plan.index(r.cell)) + shared,
                          time.time() - start,
                          ", ".join(o for o, given in (("--max-cells", later),
                                                        ("--time-limit", any(r.status == "later" for r in results)))
                                    if given))
        tracking.log_metrics({f"cells_{s}": len(summary.having(s))
                              for s in ("finished", "skipped", "failed", "shared", "stopped", "later")}
                             | {"cells_total": len(spec.cells)})
        tracking.log_table([{"cell": r.cell.key, "run_name": r.cell.name, "status": r.status,
                             "run_id": r.run_id or "", "seconds": round(r.seconds, 1),
                             "config_hash": r.cell.config_hash} for r in summary.results], "cells")
        for r in summary.failed:
            tracking.log_text(r.output, f"failed/{r.cell.name}.log")
        echo(summary.line())
        tracking.describe(f"{about}{summary.line()}; the `cells` table lists each cell's run.")
        for r in summary.failed:
            tail = "\n".join("      " + line for line in r.output.rstrip().splitlines()[-8:])
            echo(f"  failed: {r.cell.key} ({r.cell.name}, run {r.run_id or 'not created'}):\n{tail}")
        if summary.failed:
            raise SweepFailed(summary)
    return summary


@contextlib.contextmanager
def _close_cells_left_running(experiment: str, parent_run_id: str, name: str, results: list[Result],
                              echo: Callable[[str], None]):
    """On an interruption, once the cells have stopped (closing the stream waits for them):
    close the runs of those that could not close their own (SIGKILLed when their grace ran
    out, e.g. an artifact upload to a slow server), so that a stopped sweep leaves no run
    RUNNING; on a stop (Ctrl-C, SIGTERM), say what it leaves for the next run."""
    try:
        yield
    except BaseException as e:
        with interrupts.closing():
            for run_id in tracking.running_children(experiment, parent_run_id):
                tracking.end_if_running(run_id, "KILLED", "the sweep was stopped, and its cell's process ended "
                                        "before it closed its run")
            if isinstance(e, KeyboardInterrupt):
                with contextlib.suppress(OSError):  # a terminal that is gone
                    echo(f"sweep {name} stopped ({interrupts.cause(e)}): "
                         f"{plural(sum(r.status == 'finished' for r in results), 'cell')} finished before the stop; "
                         f"a cell stopped in training keeps its checkpoint: the same command runs the cells left, "
                         f"resuming it")
        raise


def precision_change(plan: list[Cell], done: dict[str, str], todo: list[Cell]) -> str | None:
    """Why the cells of `todo` would train here in another precision than the finished cells
    of `plan` did (their runs' `precision` tags), or None. `precision: auto` is bf16 where bf16
    is native and fp32 elsewhere, so a study resumed on another machine would otherwise
    change its arithmetic half-way without a word (BENCHMARKS.md: a bf16 cost of up to about
    a point of accuracy is not ruled out)."""
    from prunetrack import training
    from prunetrack.job import resolve_device

    if not todo:
        return None
    trained = Counter(tracking.tag_values([done[c.config_hash] for c in plan if c.config_hash in done],
                                          "precision").values())
    if not trained:
        return None
    here: dict[str, list[Cell]] = {}
    for c in todo:
        resolved = training.resolve_precision(c.config.train.precision, resolve_device(c.config.run.device))
        here.setdefault(resolved, []).append(c)
    new = {p: cells for p, cells in here.items() if p not in trained}
    if not new:
        return None
    before = join_words([f"{plural(n, 'finished cell')} in {p}" for p, n in trained.most_common()])
    now = join_words([f"{plural(len(cells), 'cell')} left in {p}" for p, cells in new.items()])
    auto = any(c.config.train.precision == "auto" for cells in new.values() for c in cells)
    why = f" (precision auto: {training.WHERE_BF16_IS_NATIVE})" if auto else ""
    return f"this machine would train the {now}{why}, where the sweep has {before}: a protocol change between cells"


@dataclass
class CellState:
    """A cell of the plan as a dry run sees it: `state` for people (finished / partial at
    epoch k of n / pending), `left` its estimated seconds (None: no estimate), `start` the
    epoch its checkpoint holds and `epochs` those it would train in all (a pre-training:
    as many as earlier ones took before their patience stopped them, else its maximum)."""

    cell: Cell
    state: str
    left: float | None
    start: int = 0
    epochs: int = 0


def cell_states(plan: list[Cell], done: dict[str, str], estimator) -> list[CellState]:
    """Each cell of `plan` with its state and estimated seconds left (see CellState)."""
    from prunetrack import checkpoint

    out = []
    for c in plan:
        cfg = c.config
        if c.config_hash in done:
            out.append(CellState(c, f"finished (run {done[c.config_hash][:8]})", 0.0))
            continue
        saved = checkpoint.peek(cfg.run.checkpoint_dir, c.checkpoint_key)
        start = saved["epoch"] if saved else 0
        epochs = cfg.train.pre_epochs if c.kind == "pretrain" else cfg.train.post_epochs
        state = f"partial: epoch {start} of {epochs}" if saved else \
            "pending" + (f" (at most {epochs} epochs)" if c.kind == "pretrain" else "")
        expected = (estimator.pretrain_epochs(cfg) or epochs) if c.kind == "pretrain" else epochs
        out.append(CellState(c, state, estimator.left(cfg, c.kind, start), start, expected))
    return out


def dry_run_table(spec: Spec, plan: list[Cell], done: dict[str, str], parallel: int,
                  echo: Callable[[str], None], experiment: str = "", time_limit: float | None = None) -> float:
    """List every cell with its state (finished / partial at epoch k of n / shared / pending)
    and its estimated time on this machine, from the epochs of earlier runs of the same
    training here or else a short probe; with `time_limit` (seconds), also what a sweep
    started now with that limit would do with each cell left. Returns the total seconds."""
    from prunetrack import checkpoint, estimate

    estimator = estimate.Estimator(tracking.speed_records(experiment or spec.experiment),
                                   {c.config.prune.pruner for c in plan if c.config_hash not in done}, echo=echo)
    states = cell_states(plan, done, estimator)
    verdicts = {} if time_limit is None else by_the_limit(states, done, estimator, time_limit, max(parallel, 1))
    # "done after": from now until the cell would finish, the cells running in the plan's order
    # (over `parallel` when several run at once: an approximation), so that a study run in
    # pieces can be planned, e.g. how long until every cell of a table has a run.
    rows, total = [], 0.0
    for st in states:
        c = st.cell
        total += st.left or 0.0
        rows.append((c.key, c.name, st.state, clock(st.left or 0.0),
                     "" if c.config_hash in done else clock(total / max(parallel, 1)), str(verdicts.get(c.key, ""))))
    rows += [(c.key, c.name, "shared: computed by " + c.shared_with, clock(0), "", "")
             for c in spec.cells if c.shared_with]
    # Columns as wide as their longest entry, so that long cell keys (overrides) stay aligned.
    widths = [max(len(r[i]) for r in [("cell", "run name", "state")] + rows) for i in range(3)]
    header = ("cell", "run name", "state", "estimate", "done after", "by the time limit" if verdicts else "")
    for row in [header] + rows:
        echo(("  " + " ".join(f"{v:{w}s}" for v, w in zip(row, widths)) + f" {row[3]:>9s} {row[4]:>10s}"
              + (f"  {row[5]}" if row[5] else "")).rstrip())
    if time_limit is not None:
        counts = Counter(v.kind for v in verdicts.values())
        stops = [f"{st.cell.name} after epoch {v.reached} of {v.epochs}" for st in states
                 if (v := verdicts.get(st.cell.key)) and v.kind == "stops"]
        echo(f"time limit {clock(time_limit)} (until "
             f"{time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(time.time() + time_limit))}, were the sweep started "
             f"now): {plural(counts['finishes'], 'cell')} would finish"
             + (f", {stops[0]} (then stops at its checkpoint)" if stops else "")
             + f", {counts['later']} left for a later run"
             + (f", {counts['?']} not estimated" if counts["?"] else ""))
    for line in estimator.sources():
        echo("  " + line)
    checkpoint_dir = plan[0].config.run.checkpoint_dir if plan else ""
    saved = checkpoint.saved(checkpoint_dir)
    echo(f"  checkpoints: {len(saved)} saved, {sum(size for size, _ in saved.values()) / 2**20:,.0f} MiB in "
         f"{checkpoint.root(checkpoint_dir)}")
    # A folder no cell of this spec would resume from: another spec's cell sharing the root, or a
    # cell whose configuration changed since; it stays on disk until someone deletes it.
    ours = {c.checkpoint_key for c in plan}
    for key, (size, where) in saved.items():
        if key not in ours:
            at = (f"run {str(where.get('run_id'))[:8]}, {where.get('phase')} epoch {where.get('epoch')}"
                  f"/{where.get('epochs')}, " if where else "")
            echo(f"    {key} ({at}{size / 2**20:,.0f} MiB) is no cell of this spec: another spec's, or one whose "
                 "configuration has changed; delete its folder once its run is abandoned")
    pretrains = [c for c in plan if c.kind == "pretrain" and c.config_hash not in done]
    expected = [estimator.pretrain_epochs(c.config) for c in pretrains]
    note = ""
    if pretrains:
        note = ("; pre-training counted at its maximum epochs" if None in expected else
                f"; pre-training counted at the {join_epochs(expected)} epochs earlier ones took before their patience "
                "stopped them, not at its maximum")
    echo(f"estimated time for what is left: {clock(total / max(parallel, 1))}"
         + (f" ({parallel} at a time; {clock(total)} of cell time)" if parallel > 1 else "") + note)
    return total


@dataclass
class Verdict:
    """What a sweep started now with a time limit would do with a cell: `kind` "finishes",
    "stops" (after epoch `reached` of `epochs`, at its checkpoint), "later" (not started), or
    "?" (no estimate, for it or a cell before it)."""

    kind: str
    reached: int = 0
    epochs: int = 0

    def __str__(self) -> str:
        return f"stops: after epoch {self.reached} of {self.epochs}" if self.kind == "stops" else self.kind


def by_the_limit(states: list[CellState], done: dict[str, str], estimator,
                 time_limit: float, parallel: int = 1) -> dict[str, Verdict]:
    """What a sweep started now with `time_limit` seconds would do with each cell left (by
    cell key), as the sweep and its jobs decide: the cells run in the plan's order; one whose
    next checkpoint would not be saved in time is not started (a shorter one after it may
    be); one that would save some epochs but not finish stops at its last checkpoint, and
    no cell starts after it; a cell without an estimate makes it and those after it "?"."""
    verdicts, used, stopped, unknown = {}, 0.0, False, False
    for st in states:
        c = st.cell
        if c.config_hash in done:
            continue
        if unknown or st.left is None:
            verdicts[c.key], unknown = Verdict("?"), True
            continue
        if stopped:
            verdicts[c.key] = Verdict("later")
            continue
        reached = estimator.epochs_within(c.config, c.kind, st.start, time_limit - used / parallel)
        if reached >= st.epochs:
            verdicts[c.key], used = Verdict("finishes"), used + st.left
        elif reached > st.start:
            verdicts[c.key], stopped = Verdict("stops", reached, st.epochs), True
        else:
            verdicts[c.key] = Verdict("later")
    return verdicts


def join_epochs(counts: list) -> str:
    values = sorted(set(counts))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _estimator(todo: list[Cell], experiment: str):
    """The estimates of the cells of `todo` from the epochs of earlier runs of their training
    on this kind of device (no probe: the sweep starts at once)."""
    from prunetrack import estimate

    return estimate.Estimator(tracking.speed_records(experiment), {c.config.prune.pruner for c in todo}, probe=False)


def _in_time(estimator, deadline: float, results: list[Result]) -> Callable[[Cell], bool]:
    """Whether a cell, started now, would save its next epoch before `deadline`, by
    `estimator`; a cell it cannot estimate is started (its job still stops before an epoch
    once the limit has passed). Never once a cell of `results` (this sweep's, so far) was
    stopped by the limit: that cell measured the machine as it is now, which may be slower
    than the earlier runs say."""
    from prunetrack import checkpoint

    def may_start(cell: Cell) -> bool:
        if any(r.status == "stopped" for r in results):
            return False
        saved = checkpoint.peek(cell.config.run.checkpoint_dir, cell.checkpoint_key)
        needed = estimator.next_save(cell.config, cell.kind, saved["epoch"] if saved else 0)
        return time.time() + (needed or 0.0) <= deadline

    return may_start


def _estimates(todo: list[Cell], estimator) -> dict[str, float] | None:
    """Each cell's estimated seconds by `estimator` (see _estimator); None unless every cell
    has one."""
    found = {st.cell.key: st.left for st in cell_states(todo, {}, estimator)}
    return found if all(v is not None for v in found.values()) else None


class _Progress:
    """Progress lines: cells done/total, the cell starting or ending, elapsed time, and the
    time left: the estimates of the cells not finished (`estimates`, per cell key, from
    earlier runs' epochs) over `parallel`, or, without them, the time per cell so far."""

    def __init__(self, total: int, skipped: int, todo: int, start: float, echo,
                 estimates: dict[str, float] | None = None, parallel: int = 1, deadline: float | None = None):
        self.total, self.done, self.left, self.ran, self.deadline = total, skipped, todo, 0, deadline
        self.start, self.first, self.echo = start, None, echo
        self.estimates, self.parallel = dict(estimates) if estimates else None, parallel
        self.lock = threading.Lock()

    def started(self, cell: Cell, where: str) -> None:
        with self.lock:
            self.first = self.first or time.time()
            self.echo(f"[{self.done}/{self.total}] start {cell.key} ({cell.name}) on {where} | {self._times()}")

    def finished(self, result: Result) -> None:
        with self.lock:
            self.done, self.left, self.ran = self.done + 1, self.left - 1, self.ran + 1
            if self.estimates is not None:
                self.estimates.pop(result.cell.key, None)
            run = f", run {result.run_id}" if result.run_id else ""
            self.echo(f"[{self.done}/{self.total}] {result.status} {result.cell.key} in {clock(result.seconds)}"
                      f"{run} | {self._times()}")

    def _times(self) -> str:
        now = time.time()
        elapsed = now - self.start
        limit = f", time limit in {clock(max(self.deadline - now, 0))}" if self.deadline is not None else ""
        if self.estimates is not None:
            return f"elapsed {clock(elapsed)}, ETA {clock(sum(self.estimates.values()) / self.parallel)}{limit}"
        rate = (now - (self.first or now)) / self.ran if self.ran else None  # from the first cell's start
        eta = clock(rate * self.left) if rate is not None else ("0:00:00" if self.left <= 0 else "?")
        return f"elapsed {clock(elapsed)}, ETA {eta}{limit}"
