"""Sweeps: spec validation, grid expansion, parent/child runs, resume after a kill,
failing cells, parallel cells on one SQLite store, and the Ray executor.

Every cell is a real `prunetrack prune` process on a tiny synthetic subset (seconds)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from conftest import CROWD, REPO, speed_record

from prunetrack import cli, executors, pruning, sweep, tracking
from prunetrack import spec as specs

# A cell: a real job, as small as it gets.
TINY = dict(dataset="synthetic", model="resnet20", post_epochs=1, train_subset=200, test_subset=100,
            batch_size=100, test_batch_size=100, device="cpu")


def write_spec(tmp_path, grid, name="t", base=None, overrides=None, experiment="sweeps", description=None) -> str:
    raw = {"name": name, "experiment": experiment, "base": {**TINY, **(base or {})}, "grid": grid}
    if overrides:
        raw["overrides"] = overrides
    if description is not None:
        raw["description"] = description
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def runs(experiment="sweeps"):
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return mlflow.MlflowClient().search_runs([exp.experiment_id], max_results=1000)


def children(experiment="sweeps"):
    return [r for r in runs(experiment) if "mlflow.parentRunId" in r.data.tags]


def parents(experiment="sweeps"):
    return [r for r in runs(experiment) if r.info.run_name.startswith("sweep-")]


# ---------------------------------------------------------------------------- specs

def bad(tmp_path, raw) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(specs.SpecError) as e:
        specs.load_spec(str(path))
    return str(e.value)


def test_spec_errors_name_the_bad_key(tmp_path):
    assert "'grdi'" in bad(tmp_path, {"grdi": {"pruner": ["rand"]}})
    msg = bad(tmp_path, {"base": {"prunner": "mag"}})
    assert "base" in msg and "'prunner'" in msg and "did you mean 'pruner'" in msg
    assert "grid.pruner" in bad(tmp_path, {"grid": {"pruner": "mag"}})  # not a list
    assert "grid.compression" in bad(tmp_path, {"grid": {"compression": [10, "ten"]}})
    assert "'run_name'" in bad(tmp_path, {"base": {"run_name": "x"}})
    assert "overrides[0].set" in bad(tmp_path, {"overrides": [{"when": {"pruner": "mag"}, "set": {"pre_epoch": 2}}]})
    # A value that is only wrong in one cell: the message names the cell, the field and the choices.
    msg = bad(tmp_path, {"grid": {"pruner": ["rand", "nope"]}})
    assert "cell pruner=nope" in msg and "unknown pruner 'nope'" in msg and "rand" in msg
    assert "compression must be >= 1" in bad(tmp_path, {"grid": {"compression": [0.5]}})
    assert "same configuration" in bad(tmp_path, {"grid": {"seed": [1, 1]}})
    assert "description must be a string" in bad(tmp_path, {"description": ["a", "list"]})


def test_non_finite_values_are_refused_naming_the_cell():
    with pytest.raises(specs.SpecError, match=r"cell lr=nan: lr must be a finite number"):
        specs.parse_spec({"grid": {"lr": [float("nan")]}})
    with pytest.raises(specs.SpecError, match=r"cell seed=0: compression must be a finite number"):
        specs.parse_spec({"base": {"compression": "inf"}, "grid": {"seed": [0]}})


def test_spec_without_a_grid_is_refused(tmp_path):
    for raw in ({"name": "x", "grid": {}}, {"name": "x"}, {"name": "x", "base": {"model": "resnet20"}}):
        with pytest.raises(specs.SpecError, match=r"spec 'x' has no grid: list at least one axis"):
            specs.parse_spec(raw)
    assert "spec 'bad' has no grid" in bad(tmp_path, {"base": {"model": "resnet20"}})  # named after the file


def test_grid_expands_with_overrides(tmp_path):
    spec = specs.load_spec(write_spec(tmp_path, {"pruner": ["rand", "mag"], "compression": [2, 10], "lr": [0.01]},
                                      overrides=[{"when": {"pruner": "mag"}, "set": {"pre_epochs": 3}}]))
    assert [c.key for c in spec.cells] == [
        "pruner=rand,compression=2,lr=0.01", "pruner=rand,compression=10,lr=0.01",
        "pruner=mag,compression=2,lr=0.01", "pruner=mag,compression=10,lr=0.01"]
    assert [c.config.train.pre_epochs for c in spec.cells] == [0, 0, 3, 3]
    assert spec.cells[3].name == "resnet20-mag-10x-s0-lr=0.01"
    assert spec.cells[3].config.prune.compression == 10.0 and spec.cells[3].config.run.experiment == "sweeps"
    assert len({c.config_hash for c in spec.cells}) == 4
    # The cell's command line carries every field, so the job computes the same hash.
    cmd = executors.cell_command(spec.cells[2])
    assert cmd[cmd.index("--pre-epochs") + 1] == "3" and cmd[cmd.index("--pruner") + 1] == "mag"


def test_a_list_of_grids_runs_one_after_another(tmp_path):
    spec = specs.load_spec(write_spec(tmp_path, [{"compression": [10, 1], "pruner": ["rand"]},
                                                 {"compression": [10], "pruner": ["rand"], "post_epochs": [3]},
                                                 {"compression": [2], "pruner": ["rand"]}]))
    assert [c.key for c in spec.cells] == ["compression=10,pruner=rand", "compression=1,pruner=rand",
                                           "compression=10,pruner=rand,post_epochs=3", "compression=2,pruner=rand"]
    assert [c.config.train.post_epochs for c in spec.cells] == [1, 1, 3, 1]
    assert "grid[1].seed must be a non-empty list" in bad(tmp_path, {"grid": [{"seed": [0]}, {"seed": []}]})
    assert "grid[0] must map field names to lists" in bad(tmp_path, {"grid": [["seed", 0]]})
    assert "same configuration" in bad(tmp_path, {"grid": [{"seed": [0]}, {"seed": [0]}]})


def test_a_pretraining_is_planned_before_the_first_cell_left_that_needs_it(tmp_path):
    # Resumed where the pre-training's weights are gone (another machine): the cells that
    # need none run first, and the pre-training just before the next Magnitude cell.
    path = write_spec(tmp_path, [{"pruner": ["mag"], "compression": [10]}, {"pruner": ["rand"], "compression": [10]},
                                 {"pruner": ["mag"], "compression": [2]}],
                      overrides=[{"when": {"pruner": "mag"}, "set": {"pre_epochs": 1}}])
    spec = specs.load_spec(path)
    keys = lambda plan: [c.key for c in plan]
    assert keys(spec.plan()) == ["pretrain:resnet20-pretrain-1ep-s0", "pruner=mag,compression=10",
                                 "pruner=rand,compression=10", "pruner=mag,compression=2"]
    assert keys(spec.plan({spec.cells[0].config_hash})) == [
        "pruner=mag,compression=10", "pruner=rand,compression=10", "pretrain:resnet20-pretrain-1ep-s0",
        "pruner=mag,compression=2"]
    assert keys(spec.plan({spec.cells[0].config_hash, spec.cells[2].config_hash})) == [c.key for c in spec.cells]


def test_shipped_smoke_spec_plans_its_grid(tmp_path, mlflow_store):
    result = CliRunner().invoke(cli.cli, ["sweep", os.path.join(REPO, "sweeps", "smoke.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "4 cells" in result.output and result.output.count(" pending ") == 5  # and the pre-training
    # Magnitude's pre-training is planned once, before the first Magnitude cell.
    lines = [line.split()[0] for line in result.output.splitlines() if " pending" in line]
    assert lines == ["pruner=rand,compression=2", "pruner=rand,compression=10", "pretrain:resnet20-pretrain-1ep-s0",
                     "pruner=mag,compression=2", "pruner=mag,compression=10"]
    assert "estimated time for what is left:" in result.output
    assert runs("prunetrack-smoke") == []  # a dry run creates nothing


def test_dry_run_shows_partial_cells_and_checkpoints_no_cell_resumes(tmp_path, mlflow_store):
    """The dry run reads each cell's checkpoint (partial at epoch k of n) and names the saved
    states under the same root that no cell of the spec would resume from, so that a user
    can see what holds the disk."""
    from prunetrack import checkpoint

    spec = specs.load_spec(write_spec(tmp_path, {"compression": [2, 10]}, base={"post_epochs": 3}))

    def save(key: str, progress: dict, size: int) -> None:
        folder = os.path.join(checkpoint.root(), key)
        os.makedirs(folder)
        with open(os.path.join(folder, "state.pt"), "wb") as f:
            f.write(b"\0" * size)
        with open(os.path.join(folder, checkpoint.PROGRESS), "w") as f:
            json.dump(progress, f)

    save(spec.cells[1].config_hash, {"phase": "train", "epoch": 1, "epochs": 3, "run_id": "a" * 32}, 2**20)
    save("0123456789abcdef", {"phase": "train", "epoch": 2, "epochs": 10, "run_id": "b" * 32}, 3 * 2**20)
    lines: list[str] = []
    sweep.run_sweep(spec, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert re.search(r"compression=10 .* partial: epoch 1 of 3", text), text
    assert "checkpoints: 2 saved, 4 MiB" in text
    stray = [line for line in lines if "no cell of this spec" in line]
    assert len(stray) == 1 and "0123456789abcdef (run bbbbbbbb, train epoch 2/10, 3 MiB)" in stray[0], text
    # "done after" adds up the estimates in the order the cells run; the last is the total.
    rows = [line.split() for line in lines if re.search(r" (pending|partial: epoch \d+ of \d+) ", line)]
    assert len(rows) == 2, text
    seconds = [[sum(int(x) * 60 ** i for i, x in enumerate(reversed(t.split(":")))) for t in row[-2:]]
               for row in rows]
    assert seconds[0][1] == seconds[0][0] and abs(seconds[1][1] - (seconds[0][0] + seconds[1][0])) <= 1, text
    total = next(line for line in lines if line.startswith("estimated time for what is left:"))
    assert total.split(": ")[1].split()[0] == rows[-1][-1], text


def test_estimates_use_the_epochs_of_runs_of_the_same_training_on_the_same_device():
    from prunetrack import estimate
    from prunetrack.config import JobConfig

    cfg = JobConfig.from_flat(dict(dataset="cifar10", model="vgg16_bn", batch_size=256, pruner="snip"))
    tags = {"model": "vgg16_bn", "dataset": "cifar10", "device": "cpu (x86_64, 2 threads)", "precision": "bf16",
            "pruner": "snip"}
    params = {"batch_size": "256", "test_batch_size": "256", "optimizer": "adam", "train_subset": "0",
              "test_subset": "0", "iterations": "1"}
    record = lambda epochs, **changes: {"tags": {**tags, **changes}, "params": params, "epoch_times": epochs,
                                        "metrics": {"test_images_per_sec": 1000.0, "pruning_time": 2.0}}
    records = [record([100.0, 100.0, 400.0]), record([100.0, 125.0]),  # a disturbed epoch (400 s) is outvoted
               record([10.0] * 5, device="NVIDIA H100"),               # another device: not these rates
               record([100.0], dense="true")]                          # trained, but scored nothing
    records[-1]["metrics"] = {"test_images_per_sec": 1000.0, "pruning_time": 0.0}
    rates, source = estimate.measured(cfg, records, "cpu (x86_64, 2 threads)", "bf16")
    assert rates.train == 50_000 / 100.0 and rates.test == 1000.0 and rates.prune_round == {"snip": 2.0}
    assert source == "the median of 6 epochs of 3 finished runs on this kind of device"
    assert estimate.seconds(cfg, rates) == 2.0 + 10 * (100.0 + 10.0) + (cfg.run.timing_repeats + 1) * 10.0
    # What a time limit weighs before starting a cell: its pruning, if still to do, and one epoch.
    assert estimate.next_save(cfg, rates) == 2.0 + 100.0 + 10.0
    assert estimate.next_save(cfg, rates, done_epochs=3) == estimate.next_save(cfg, rates, "pretrain") == 110.0
    assert estimate.measured(cfg, records, "cpu (x86_64, 2 threads)", "fp32") is None
    # A run stopped before its final timing: its epochs' evaluations give the test rate.
    stopped = {**record([200.0, 200.0]), "status": "KILLED", "metrics": {}, "eval_times": [20.0, 20.0]}
    rates, source = estimate.measured(cfg, [stopped], "cpu (x86_64, 2 threads)", "bf16")
    assert rates.train == 50_000 / 200.0 and rates.test == 10_000 / 20.0 and rates.prune_round == {}
    assert source == "the median of 2 epochs of 1 run (0 finished) on this kind of device"


def test_a_pretraining_that_stops_on_patience_is_estimated_at_the_epochs_earlier_ones_took():
    from prunetrack import estimate, training
    from prunetrack.config import JobConfig
    from prunetrack.job import device_name, resolve_device

    cfg = JobConfig.from_flat(dict(dataset="cifar10", model="vgg16_bn", pruner="mag", pre_epochs=200,
                                   pre_patience=5, device="cpu"))
    device = resolve_device("cpu")
    tags = {"model": "vgg16_bn", "dataset": "cifar10", "device": device_name(device),
            "precision": training.resolve_precision("auto", device)}
    params = {"batch_size": "256", "test_batch_size": "256", "optimizer": "adam", "train_subset": "0",
              "test_subset": "0", "pre_epochs": "200", "pre_patience": "5"}
    pretrain = {"tags": {**tags, "prunetrack.kind": "pretrain"}, "params": params, "metrics": {},
                "epoch_times": [100.0] * 18}
    job = {"tags": {**tags, "pruner": "mag"}, "params": {**params, "iterations": "1"}, "epoch_times": [100.0] * 10,
           "metrics": {"test_images_per_sec": 1000.0, "pruning_time": 1.0}}
    unfinished = {**pretrain, "status": "RUNNING", "epoch_times": [100.0] * 3}  # has not stopped yet: not counted
    estimator = estimate.Estimator([pretrain, unfinished, job], {"mag"}, probe=False)
    assert estimator.pretrain_epochs(cfg) == 18
    assert estimator.left(cfg, "pretrain", 3) == 15 * (100.0 + 10.0)  # 15 epochs to go, each with its evaluation
    # Another stopping rule, or none: the cap is all that is known.
    assert estimate.Estimator([pretrain, job], {"mag"}, probe=False).pretrain_epochs(
        JobConfig.from_flat(dict(dataset="cifar10", model="vgg16_bn", pre_epochs=200, pre_patience=0))) is None


def test_runs_that_timed_the_training_leave_only_the_missing_pruning_rounds_to_probe(monkeypatch):
    """Where earlier runs timed the training but not every pruner of the sweep, the estimate
    keeps their rates and probes a scoring round of the others only (no training steps,
    which would share the cores with a sweep in progress)."""
    from prunetrack import estimate, training
    from prunetrack.config import JobConfig
    from prunetrack.job import device_name, resolve_device
    from prunetrack.progress import plural

    cfg = JobConfig.from_flat(dict(dataset="cifar10", model="resnet20", pruner="rand", device="cpu"))
    device = resolve_device("cpu")
    tags = {"model": "resnet20", "dataset": "cifar10", "device": device_name(device),
            "precision": training.resolve_precision("auto", device), "pruner": "snip"}
    params = {"batch_size": "256", "test_batch_size": "256", "optimizer": "adam", "train_subset": "0",
              "test_subset": "0", "iterations": "1"}
    job = {"tags": tags, "params": params, "epoch_times": [100.0] * 3,
           "metrics": {"test_images_per_sec": 1000.0, "pruning_time": 3.0}}
    said: list[str] = []
    quiet = estimate.Estimator([job], {"snip", "rand"}, echo=said.append)
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    rates = quiet.rates_for(cfg)
    assert rates.train == 500.0 and rates.test == 1000.0  # the run's, not a probe's
    assert rates.prune_round["snip"] == 3.0 and rates.prune_round["rand"] > 0
    assert said == ["  (probing a pruning round of rand on resnet20 ...)"]
    assert "probed" not in quiet.sources()[0]
    # Probed while other work holds the cores: the line with the rates says the probe overstates.
    monkeypatch.setattr(estimate.os, "getloadavg", lambda: (2.0 * (os.cpu_count() or 1), 0.0, 0.0))
    busy = estimate.Estimator([job], {"snip", "rand"}, echo=said.append)
    busy.rates_for(cfg)
    assert (f"on this kind of device; pruning rounds of rand probed while the machine was busy (load average "
            f"{2.0 * (os.cpu_count() or 1):.2f} on {plural(os.cpu_count() or 1, 'core')}): overstated): train 500 img/s"
            in busy.sources()[0]), busy.sources()


def test_study_specs_cover_the_study():
    missing = [p for p in ("rand", "mag", "snip", "grasp", "synflow") if p not in pruning.PRUNERS]
    if missing:
        pytest.skip(f"pruners not registered here: {', '.join(missing)}")
    vgg = specs.load_spec(os.path.join(REPO, "sweeps", "study_vgg16.yaml"))
    grid = [c for c in vgg.cells if c.config.train.post_epochs == 10 and c.config.run.seed == 0]
    assert len(grid) == 30 and {c.config.prune.compression for c in grid} == {1, 2, 5, 10, 15, 20}
    # The tables' cells (20, 2, 5, 15x), Magnitude's last, so that one pre-training serves them together.
    tables = vgg.cells[11:31]
    assert {c.config.prune.compression for c in tables} == {20, 2, 5, 15}
    assert [c.config.prune.pruner for c in tables].index("mag") == 16 and \
        {c.config.prune.pruner for c in tables[16:]} == {"mag"}
    # Then seeds 1 and 2 of the 10x row.
    seeds = vgg.cells[31:41]
    assert {(c.config.run.seed, c.config.prune.compression, c.config.train.post_epochs) for c in seeds} == \
        {(1, 10, 10), (2, 10, 10)} and {c.config.prune.pruner for c in seeds} == set(pruning.PRUNERS) & {
            "rand", "mag", "snip", "grasp", "synflow"}
    assert len(vgg.cells) == 45
    # The 10x row again at 30 epochs: Random right after the 10x row and the dense cell, the
    # others last, after the tables' cells (20, 2, 5, 15x) and the seeds.
    longer = [c for c in vgg.cells if c.config.train.post_epochs == 30]
    assert len(longer) == 5 and {c.config.prune.compression for c in longer} == {10}
    assert vgg.cells.index(longer[0]) == 10 and longer[0].name == "vgg16_bn-rand-10x-s0-post_epochs=30"
    assert [vgg.cells.index(c) for c in longer[1:]] == [41, 42, 43, 44]
    assert {c.config.train.pre_epochs for c in vgg.cells if c.config.prune.pruner == "mag"} == {200}
    assert {c.config.train.pre_epochs for c in vgg.cells if c.config.prune.pruner != "mag"} == {0}
    resnet = specs.load_spec(os.path.join(REPO, "sweeps", "study_resnet50.yaml"))
    assert len(resnet.cells) == 5 and {c.config.model.model for c in resnet.cells} == {"resnet50"}


# ---------------------------------------------------------------------------- running sweeps

def test_a_sweep_on_a_new_machine_estimates_the_cells_left_once_one_cell_finished(tmp_path, mlflow_store,
                                                                                  monkeypatch):
    """A sweep that starts with no earlier runs on this kind of device cannot estimate its
    cells; once a cell finished here, the cells left of the same training have an estimate,
    and the time limit uses it: here it says an epoch takes 10 minutes, so with 5 minutes
    left the second cell is not started."""

    path = write_spec(tmp_path, {"compression": [2, 10]})
    cell = specs.load_spec(path).cells[0]
    record = speed_record(cell.config, [600.0])
    calls = []

    def speed_records(experiment):  # none when the sweep starts; after, as if the first cell had taken 600 s
        calls.append(experiment)
        return [record] if len(calls) > 1 else []

    monkeypatch.setattr(tracking, "speed_records", speed_records)
    said = []
    summary = sweep.run_sweep(specs.load_spec(path), time_limit=300, echo=said.append)
    assert [r.status for r in summary.results] == ["finished", "later"], "\n".join(said)
    assert any("time limit: 1 cell not started" in line for line in said), "\n".join(said)
    assert any(re.search(r"\[1/2\] finished compression=2 .* ETA 0:10:", line) for line in said), "\n".join(said)


def test_a_dry_run_with_a_time_limit_says_which_cells_it_would_finish_stop_or_leave(tmp_path, mlflow_store,
                                                                                    monkeypatch):
    """Planning a piece of a long sweep: with --time-limit the dry run says, as the sweep
    would decide, which cells finish, which stops at which checkpoint, and which are left."""

    path = write_spec(tmp_path, {"compression": [2, 5, 10]}, base={"post_epochs": 3})
    cell = specs.load_spec(path).cells[0]
    # Earlier runs here: 100 s of training and 1 s of testing an epoch, 2 s of pruning.
    record = speed_record(cell.config, [100.0], pruning_time=2.0)
    monkeypatch.setattr(tracking, "speed_records", lambda experiment: [record])
    per_cell = 2 + 3 * 101 + (cell.config.run.timing_repeats + 1) * 1  # pruning, 3 epochs, the final test passes
    # The first cell finishes; the second saves two epochs (a third would end after the limit); the third waits.
    result = CliRunner().invoke(cli.cli, ["sweep", path, "--dry-run", "--time-limit", f"{per_cell + 2 + 2 * 101 + 50}s"])
    assert result.exit_code == 0, result.output
    verdict = {line.split()[0]: line.split("  ")[-1] for line in result.output.splitlines()
               if line.startswith("  compression=")}
    assert verdict == {"compression=2": "finishes", "compression=5": "stops: after epoch 2 of 3",
                       "compression=10": "later"}, result.output
    assert ("1 cell would finish, resnet20-rand-5x-s0 after epoch 2 of 3 (then stops at its checkpoint), "
            "1 left for a later run") in result.output
    # Too short for any first epoch: every cell is left; none is started to be stopped at once.
    short = CliRunner().invoke(cli.cli, ["sweep", path, "--dry-run", "--time-limit", "90s"])
    assert "0 cells would finish, 3 left for a later run" in short.output, short.output
    # The last epoch of a cell counts its final test passes: a limit that fits the epochs but not
    # them stops the cell before its last epoch.
    tight = CliRunner().invoke(cli.cli, ["sweep", path, "--dry-run", "--time-limit", f"{per_cell - 1}s"])
    assert "resnet20-rand-2x-s0 after epoch 2 of 3" in tight.output, tight.output


@pytest.mark.slow
def test_killed_sweep_resumes_only_missing_cells(tmp_path, mlflow_store):
    path = write_spec(tmp_path, {"compression": [2, 10]}, name="resume")
    runs()  # create the store's tables here, not concurrently with the sweep process
    proc = subprocess.Popen([sys.executable, "-m", "prunetrack", "sweep", path], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:  # kill the sweep (SIGTERM, as a scheduler or `kill` would) once its first cell finished
        deadline = time.time() + 300
        while not any(r.info.status == "FINISHED" for r in children()):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no cell finished in 300 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    first = [r for r in children() if r.info.status == "FINISHED"]
    assert len(first) == 1, output
    assert all(r.info.status != "RUNNING" for r in runs()), "a kill left a run RUNNING"
    assert [r.info.status for r in parents()] == ["KILLED"]
    # The estimate for the cell left takes the finished cell's own epochs, not a probe.
    plan: list[str] = []
    sweep.run_sweep(specs.load_spec(path), dry_run=True, echo=plan.append)
    assert not any("probing" in line for line in plan), plan
    assert any("of 1 finished run on this kind of device" in line for line in plan), plan

    lines: list[str] = []
    summary = sweep.run_sweep(specs.load_spec(path), echo=lines.append)
    assert [r.status for r in summary.results] == ["skipped", "finished"]
    # With a finished run of the same training, the ETA is there from the first line, not "?".
    start_line = next(line for line in lines if "] start " in line)
    assert re.search(r"ETA \d+:\d\d:\d\d$", start_line), start_line
    finished = [r for r in children() if r.info.status == "FINISHED"]
    # The grid is full, with one FINISHED run per cell; the first cell did not run again.
    assert sorted(r.data.tags["cell"] for r in finished) == ["compression=10", "compression=2"]
    assert first[0].info.run_id in {r.info.run_id for r in finished}
    parent = next(r for r in parents() if r.info.status == "FINISHED")
    assert all(r.data.tags["sweep"] == "resume" for r in finished)
    assert {r.data.tags["mlflow.parentRunId"] for r in finished if r.info.run_id != first[0].info.run_id} == \
        {parent.info.run_id}
    assert sorted(r.info.run_name for r in finished) == ["resnet20-rand-10x-s0", "resnet20-rand-2x-s0"]
    assert parent.data.metrics["cells_skipped"] == 1 and parent.data.metrics["cells_finished"] == 1

    # Once the grid is full, running the sweep again runs nothing.
    again = sweep.run_sweep(specs.load_spec(path))
    assert {r.status for r in again.results} == {"skipped"}
    assert len([r for r in children() if r.info.status == "FINISHED"]) == 2


def test_max_cells_runs_a_piece_of_the_sweep_and_the_next_run_goes_on(tmp_path, mlflow_store):
    path = write_spec(tmp_path, {"compression": [10, 2]}, name="piece", description="Rand at **10x** and 2x.\n")
    result = CliRunner().invoke(cli.cli, ["sweep", path, "--max-cells", "0"])
    assert result.exit_code == 2 and "--max-cells" in result.output
    result = CliRunner().invoke(cli.cli, ["sweep", path, "--max-cells", "1"])
    assert result.exit_code == 0, result.output
    assert "running the first 1 cell left (--max-cells 1); 1 left for a later run" in result.output
    assert ("sweep piece: 2 cells: 1 finished, 0 skipped (already finished), 0 failed, 1 left for a later run "
            "(--max-cells)") in result.output
    # The plan's first cell ran; the parent run ended as a finished piece, not a failure.
    assert [(r.data.tags["cell"], r.info.status) for r in children()] == [("compression=10", "FINISHED")]
    [parent] = parents()
    assert parent.info.status == "FINISHED" and parent.data.metrics["cells_later"] == 1
    # The parent's Description in the UI: the spec's own, then what this piece did.
    [line] = [line for line in result.output.splitlines() if line.startswith("sweep piece: 2 cells:")]
    assert parent.data.tags["mlflow.note.content"] == (
        f"Rand at **10x** and 2x.\n\n{line}; the `cells` table lists each cell's run.")

    summary = sweep.run_sweep(specs.load_spec(path), max_cells=5, echo=lambda line: None)
    assert [(r.cell.key, r.status) for r in summary.results] == [("compression=10", "skipped"),
                                                                  ("compression=2", "finished")]


def test_a_time_limit_stops_a_cell_at_its_checkpoint_and_leaves_the_rest_for_later(tmp_path, mlflow_store,
                                                                                     monkeypatch):
    path = write_spec(tmp_path, {"compression": [10, 2]}, name="timed")
    result = CliRunner().invoke(cli.cli, ["sweep", path, "--time-limit", "soon"])
    assert result.exit_code == 2 and "'soon' is not a duration" in result.output
    # The limit (1 ms) has passed when the first cell's job reaches its first epoch, which it
    # does not start. The estimate-based check before a cell starts lets only the first one through.
    in_time = sweep._in_time
    monkeypatch.setattr(sweep, "_in_time", lambda estimator, deadline, results: lambda cell: cell.key == "compression=10")
    said = []
    summary = sweep.run_sweep(specs.load_spec(path), time_limit=0.001, echo=said.append)
    assert [(r.cell.key, r.status) for r in summary.results] == [("compression=10", "stopped"),
                                                                  ("compression=2", "later")]
    assert any(line.startswith("sweep timed: 2 cells: 0 finished, 0 skipped (already finished), 0 failed, 1 stopped "
                               "at the time limit (resumes from its checkpoint), 1 left for a later run (--time-limit)")
               for line in said), said
    assert ("time limit: 1 cell not started, as its first epoch would not be saved in time: compression=2 "
            "(resnet20-rand-2x-s0)") in said
    assert any(line.startswith("[0/2] start compression=10") and line.endswith(", time limit in 0:00:00")
               for line in said), said
    [cell] = children()
    assert cell.info.status == "KILLED" and cell.data.tags["interrupted"] == "time-limit"
    [parent] = parents()
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["cells_stopped"] == 1 and parent.data.metrics["cells_later"] == 1
    # Without a limit, the next run resumes the stopped cell in its own run and runs the other.
    monkeypatch.setattr(sweep, "_in_time", in_time)
    summary = sweep.run_sweep(specs.load_spec(path), echo=lambda line: None)
    assert [r.status for r in summary.results] == ["finished", "finished"]
    assert summary.results[0].run_id == cell.info.run_id
    assert mlflow.MlflowClient().get_run(cell.info.run_id).data.tags["resumed_at_epoch"] == "0"


def test_a_cell_whose_first_epoch_would_end_after_the_time_limit_is_not_started(tmp_path, monkeypatch):

    [cell, other] = specs.load_spec(write_spec(tmp_path, {"model": ["resnet20", "resnet32"]})).cells
    # Earlier runs of the first cell's training here: 600 s an epoch (the second cell's model has none).
    monkeypatch.setattr(tracking, "speed_records", lambda experiment: [speed_record(cell.config, [600.0])])
    results = []
    estimator = sweep._estimator([cell, other], "sweeps")
    in_half_an_hour = sweep._in_time(estimator, time.time() + 1800, results)
    assert in_half_an_hour(cell) and in_half_an_hour(other)
    in_five_minutes = sweep._in_time(estimator, time.time() + 300, results)
    assert not in_five_minutes(cell)  # 1 s of pruning, 600 s of training and 1 s of testing: too long
    assert in_five_minutes(other)  # no estimate: started, its job stops itself at the limit
    assert not sweep._in_time(estimator, time.time() - 1, results)(other)  # once the limit has passed, nothing
    # Once a cell was stopped by the limit, no other starts: this machine, now, is slower than the estimates.
    results.append(executors.Result(cell, "stopped"))
    assert not in_half_an_hour(other) and not in_half_an_hour(cell)


@pytest.mark.slow
def test_failing_cell_is_reported_and_others_finish(tmp_path, mlflow_store):
    # The cifar10 cell cannot find its data and may not download it: it fails at once.
    path = write_spec(tmp_path, {"dataset": ["synthetic", "cifar10"]}, name="fail",
                      base={"data_dir": str(tmp_path / "absent"), "download": False})
    result = CliRunner().invoke(cli.cli, ["sweep", path])
    assert result.exit_code != 0
    assert "1 finished, 0 skipped (already finished), 1 failed" in result.output
    assert "1 of 2 cells failed: dataset=cifar10" in result.output
    status = {r.data.tags["cell"]: r.info.status for r in children()}
    assert status == {"dataset=synthetic": "FINISHED", "dataset=cifar10": "FAILED"}
    failed = next(r for r in children() if r.info.status == "FAILED")
    assert "error" in failed.data.tags
    assert [r.info.status for r in parents()] == ["FAILED"]

    # Running it again retries only the failed cell (which fails again, the data still absent).
    result = CliRunner().invoke(cli.cli, ["sweep", path])
    assert result.exit_code != 0 and "0 finished, 1 skipped (already finished), 1 failed" in result.output


@pytest.mark.slow
@pytest.mark.xdist_group(CROWD)
def test_parallel_cells_on_one_sqlite_store(tmp_path, mlflow_store):
    path = write_spec(tmp_path, {"seed": [0, 1]}, name="par")
    summary = sweep.run_sweep(specs.load_spec(path), parallel=2)
    assert [r.status for r in summary.results] == ["finished", "finished"]
    assert mlflow.get_tracking_uri() == mlflow_store and os.environ["MLFLOW_TRACKING_URI"] == mlflow_store
    done = children()
    assert sorted(r.data.tags["cell"] for r in done) == ["seed=0", "seed=1"]
    assert all(r.info.status == "FINISHED" for r in done)
    for r in done:  # artifacts landed in the store's own artifact root, readable without the server
        assert "config.yaml" in {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}


@pytest.mark.slow
@pytest.mark.xdist_group(CROWD)
def test_ray_executor_runs_two_cells(tmp_path, mlflow_store):
    ray = pytest.importorskip("ray")
    path = write_spec(tmp_path, {"compression": [2, 10]}, name="ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}})
    try:
        summary = sweep.run_sweep(specs.load_spec(path), executor="ray")
    finally:
        ray.shutdown()
    assert [r.status for r in summary.results] == ["finished", "finished"]
    done = children()
    parent = parents()[0]
    assert sorted(r.data.tags["cell"] for r in done) == ["compression=10", "compression=2"]
    assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
               for r in done)


def test_parallel_cells_are_pinned_to_distinct_gpus(tmp_path, monkeypatch):
    """With 2 visible GPUs and 2 cells at a time, every cell gets one GPU of its own:
    two cells running together never share one. (The cell processes are replaced by a
    recorder; no GPU is needed.)"""
    import threading

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    spec = specs.load_spec(write_spec(tmp_path, {"seed": [0, 1, 2, 3]}))
    lock, running, seen = threading.Lock(), {}, []

    def fake_cell(command, env, on_line=None, started=None):
        with lock:
            assert env["CUDA_VISIBLE_DEVICES"] not in running.values(), "two running cells share a GPU"
            running[command[command.index("--seed") + 1]] = env["CUDA_VISIBLE_DEVICES"]
            seen.append(env["CUDA_VISIBLE_DEVICES"])
        time.sleep(0.2)
        with lock:
            del running[command[command.index("--seed") + 1]]
        return 0, ""

    monkeypatch.setattr(executors, "run_cell_process", fake_cell)
    envs = {c.key: {} for c in spec.cells}
    results = list(executors.run_local(spec.cells, envs, parallel=2, on_start=lambda cell, where: None))
    assert sorted(r.cell.key for r in results) == ["seed=0", "seed=1", "seed=2", "seed=3"]
    assert all(r.status == "finished" for r in results)
    assert sorted(seen) == ["3", "3", "5", "5"]


def test_a_cell_that_names_its_gpu_is_not_pinned_to_another(tmp_path, monkeypatch):
    """device cuda:N names a GPU among those the sweep sees: pinned to one GPU, the cell
    would see only that one, as its cuda:0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    spec = specs.load_spec(write_spec(tmp_path, {"seed": [0, 1]}, base={"device": "cuda:1"}))
    seen, where = [], []

    def fake_cell(command, env, on_line=None, started=None):
        seen.append(env.get("CUDA_VISIBLE_DEVICES"))
        return 0, ""

    monkeypatch.setattr(executors, "run_cell_process", fake_cell)
    envs = {c.key: {} for c in spec.cells}
    results = list(executors.run_local(spec.cells, envs, parallel=2, on_start=lambda cell, at: where.append(at)))
    assert all(r.status == "finished" for r in results)
    assert seen == [None, None]  # not set for the cell: it inherits the sweep's CUDA_VISIBLE_DEVICES
    assert where == ["cuda:1", "cuda:1"]


def test_one_at_a_time_a_cell_ends_before_the_next_starts(tmp_path, monkeypatch):
    # The sweep records a cell's end (its run, FAILED if its process died) and says so before
    # the next cell starts, so that the log reads in order and the ETA counts the cell as done.
    spec = specs.load_spec(write_spec(tmp_path, {"seed": [0, 1, 2]}))
    events = []
    monkeypatch.setattr(executors, "run_cell_process", lambda command, env, on_line=None, started=None: (0, ""))
    stream = executors.run_local(spec.cells, {c.key: {} for c in spec.cells}, parallel=1,
                                 on_start=lambda cell, where: events.append(("start", cell.key)))
    for result in stream:
        time.sleep(0.1)  # the caller records the result
        events.append(("end", result.cell.key))
    assert events == [("start", "seed=0"), ("end", "seed=0"), ("start", "seed=1"), ("end", "seed=1"),
                      ("start", "seed=2"), ("end", "seed=2")]
    # Stopped after the first result (SIGTERM, Ctrl-C): the next cell never starts, and nothing hangs.
    events.clear()
    stream = executors.run_local(spec.cells, {c.key: {} for c in spec.cells}, parallel=1,
                                 on_start=lambda cell, where: events.append(("start", cell.key)))
    next(stream)
    stream.close()
    assert events == [("start", "seed=0")]


STOP_WHILE_A_CELL_RUNS = """
import os, signal, sys, threading, time
from prunetrack import executors, servers, spec
cells = spec.load_spec(sys.argv[1]).cells
told = threading.Event()
def cell(command, env, on_line=None, started=None):
    told.wait()
    return -15, ""
def stop(*procs):  # the running cell takes a while to exit once told to stop
    told.set()
    time.sleep(0.5)
executors.run_cell_process, servers.stop = cell, stop
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C while the first cell runs
starts = []
try:
    for result in executors.run_local(cells, {c.key: {} for c in cells}, 1, lambda c, where: starts.append(c.key)):
        pass
except KeyboardInterrupt:
    print("stopped after starting", starts)
"""


def test_a_sweep_stopped_while_a_cell_runs_exits(tmp_path):
    # While the running cell stops, its worker must not take the next cell and wait for a slot
    # forever: the sweep would hang at exit with its run RUNNING.
    path = write_spec(tmp_path, {"seed": [0, 1, 2]})
    proc = subprocess.run([sys.executable, "-c", STOP_WHILE_A_CELL_RUNS, path], env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "stopped after starting ['seed=0']" in proc.stdout, proc.stdout + proc.stderr


def test_runs_left_running_by_dead_processes_are_closed(tmp_path, mlflow_store, monkeypatch):
    """A cell process killed outright (OOM killer) and a sweep killed with SIGKILL cannot
    close their runs; the sweep closes the first at once and the second when run again."""
    import socket

    path = write_spec(tmp_path, {"seed": [0]}, name="dead")
    spec = specs.load_spec(path)
    client = mlflow.MlflowClient()
    exp = client.create_experiment("sweeps")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    stale = client.create_run(exp, run_name="sweep-dead", tags={
        "sweep": "dead", "sweep_host": socket.gethostname(), "sweep_pid": str(gone.pid)})
    orphan = client.create_run(exp, tags={"mlflow.parentRunId": stale.info.run_id})
    killed = client.create_run(exp)  # the run of a cell whose process gets SIGKILLed

    def oom_cell(command, env, on_line=None, started=None):
        # The cell's job tagged its run as every cell does (the sweep finds it by these tags);
        # then the OOM killer struck.
        tags = {**json.loads(env[tracking.RUN_TAGS_ENV]), "config_hash": spec.cells[0].config_hash}
        for key, value in tags.items():
            client.set_tag(killed.info.run_id, key, value)
        return -9, "Killed\n"

    monkeypatch.setattr(executors, "run_cell_process", oom_cell)
    with pytest.raises(sweep.SweepFailed):
        sweep.run_sweep(spec)
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(killed.info.run_id).info.status == "FAILED"
    assert "died without closing" in client.get_run(killed.info.run_id).data.tags["error"]
    assert all(r.info.status != "RUNNING" for r in runs())


@pytest.mark.slow
def test_sweep_killed_mid_cell_resumes_that_cell_in_the_same_run(tmp_path, mlflow_store, capfd):
    """kill -9 of the whole sweep during a cell's 3rd epoch; run again: the cell continues
    from its last finished epoch in the same MLflow run."""
    from prunetrack import checkpoint

    path = write_spec(tmp_path, {"compression": [5]}, name="k9", base={"post_epochs": 5, "batch_size": 20,
                                                                       "precision": "fp32"})
    cell = specs.load_spec(path).cells[0]
    progress = os.path.join(checkpoint.root(), cell.config_hash, checkpoint.PROGRESS)
    proc, mark = _start_sweep(tmp_path, path)
    try:
        deadline = time.time() + 300
        while not (os.path.exists(progress) and json.load(open(progress))["epoch"] >= 2):
            assert proc.poll() is None and time.time() < deadline, "the cell did not reach epoch 2"
            time.sleep(0.05)
    finally:
        # The sweep and its cell (in a session of its own), at once: the sweep first, so that
        # it cannot see its cell die and close the cell's run.
        for pid in sorted(_marked(mark), key=lambda pid: pid != proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    done = json.load(open(progress))["epoch"]
    assert 2 <= done < 5
    [killed] = children()
    capfd.readouterr()
    summary = sweep.run_sweep(specs.load_spec(path))
    out = capfd.readouterr().out
    assert [r.status for r in summary.results] == ["finished"]
    assert summary.results[0].run_id == killed.info.run_id  # the same run, continued
    assert f"epoch {done}/5 finished; continuing in the same run" in out
    client = mlflow.MlflowClient()
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(killed.info.run_id, "train_loss")] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------- stopping a sweep

def _marked(mark: str) -> list[int]:
    """Pids of the live processes whose environment holds PRUNETRACK_TEST_MARK=`mark`: the
    sweep started with it and everything it started (cells, `mlflow server`, uvicorn)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"PRUNETRACK_TEST_MARK={mark}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def _start_sweep(tmp_path, path: str, *args: str) -> tuple[subprocess.Popen, str]:
    mark = f"{os.getpid()}-{time.time_ns()}"
    runs()  # create the store's tables here, not concurrently with the sweep process
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prunetrack", "sweep", path, *args], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": REPO, "PRUNETRACK_TEST_MARK": mark},
                                stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # a group of its own, as a terminal would give it
    return proc, mark


def _wait(condition, seconds: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert proc is None or proc.poll() is None, f"the sweep exited early (code {proc.returncode})"
        assert time.time() < deadline, what
        time.sleep(0.5)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists processes through /proc")
@pytest.mark.slow
@pytest.mark.xdist_group(CROWD)
def test_sigterm_to_a_parallel_sweep_stops_its_cells_then_its_server(tmp_path, mlflow_store):
    """SIGTERM to the sweep's process group (as `kill -- -PGID` or a scheduler sends it): the
    cells, in sessions of their own, are stopped by the sweep, and end KILLED while the
    tracking server it started still answers; then the server goes too."""
    path = write_spec(tmp_path, {"seed": [0, 1]}, name="term", base={"post_epochs": 50})
    proc, mark = _start_sweep(tmp_path, path, "--parallel", "2")
    try:
        _wait(lambda: len([r for r in children() if r.info.status == "RUNNING"]) == 2, 300,
              "the two cells did not start in 300 s", proc)
        assert len(_marked(mark)) >= 4  # the sweep, two cells, the server (and its uvicorn)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "sweep.log").read_text()
    assert proc.returncode != 0, log
    assert "tracking server http://127.0.0.1:" in log
    left = [r.info.run_name for r in runs() if r.info.status == "RUNNING"]
    assert not left, f"a stopped sweep left runs RUNNING: {left}\n{log}"
    assert [r.info.status for r in children()] == ["KILLED", "KILLED"], log
    assert [r.info.status for r in parents()] == ["KILLED"]
    assert ("sweep term stopped (SIGTERM): 0 cells finished before the stop; a cell stopped in training keeps its "
            "checkpoint: the same command runs the cells left, resuming it") in log
    _wait(lambda: not _marked(mark), 15, f"processes left behind: {_marked(mark)}")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="lists processes through /proc")
@pytest.mark.slow
def test_cell_of_a_sweep_killed_outright_stops_itself(tmp_path, mlflow_store):
    """kill -9 of the sweep process alone: its cell, in a session of its own, notices that
    its parent is gone, stops, and ends its run KILLED; its checkpoint stays for the next
    sweep to resume."""
    from prunetrack import checkpoint

    path = write_spec(tmp_path, {"seed": [0]}, name="orphan", base={"post_epochs": 50})
    cell = specs.load_spec(path).cells[0]
    proc, mark = _start_sweep(tmp_path, path)
    try:
        def training():
            running = [r for r in children() if r.info.status == "RUNNING"]
            return running and mlflow.MlflowClient().get_metric_history(running[0].info.run_id, "test_loss")

        _wait(training, 300, "the cell did not finish an epoch in 300 s", proc)
        [cell_pid] = [pid for pid in _marked(mark) if pid != proc.pid]
        proc.kill()  # the sweep only
        proc.wait()
        _wait(lambda: not _marked(mark), 60, f"the orphaned cell {cell_pid} is still running")
    finally:
        for pid in _marked(mark):
            os.kill(pid, signal.SIGKILL)
    [run] = children()
    assert run.info.status == "KILLED"
    assert f"the sweep process (pid {proc.pid}) died" in run.data.tags["error"]
    assert os.path.exists(os.path.join(checkpoint.root(), cell.config_hash, "state.pt"))


@pytest.mark.slow
def test_magnitude_cells_of_a_sweep_share_one_pretraining(tmp_path, mlflow_store):
    path = write_spec(tmp_path, {"compression": [2, 10]}, name="mag", base={"pruner": "mag", "pre_epochs": 1})
    summary = sweep.run_sweep(specs.load_spec(path))
    assert [r.status for r in summary.results] == ["finished"] * 3  # the pre-training, then the cells
    pre = [r for r in runs() if r.data.tags.get("prunetrack.kind") == "pretrain"]
    assert len(pre) == 1 and pre[0].info.status == "FINISHED"
    cells = [r for r in runs() if r.data.tags.get("pruner") == "mag"]
    assert len(cells) == 2 and {r.data.tags["pretrain_run"] for r in cells} == {pre[0].info.run_id}
    # Scheduled before the cells that start from it.
    assert pre[0].info.start_time < min(r.info.start_time for r in cells)


def test_a_sweep_refuses_to_train_the_cells_left_in_another_precision(mlflow_store, tmp_path):
    """precision auto is bf16 where bf16 is native and fp32 elsewhere: a study resumed on
    another machine must not change its arithmetic half-way without being told to."""
    import torch

    from prunetrack import training

    here = training.resolve_precision("auto", torch.device("cpu"))
    other = "fp32" if here == "bf16" else "bf16"
    path = write_spec(tmp_path, [{"pruner": ["rand"], "compression": [2, 5, 10]}])
    cells = specs.load_spec(path).cells
    mlflow.set_experiment("sweeps")
    with mlflow.start_run(run_name=cells[0].name,
                          tags={"config_hash": cells[0].config_hash, "precision": other}):
        pass  # the first cell, finished on a machine where auto resolved to the other precision

    result = CliRunner().invoke(cli.cli, ["sweep", path])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert (f"this machine would train the 2 cells left in {here} (precision auto: bf16 is native only on CUDA GPUs since Ampere "
            f"and on CPUs with AMX or AVX512-BF16), where the sweep has 1 finished cell in {other}") in message
    assert "pass --allow-precision-change" in message
    assert len(runs()) == 1  # refused before the sweep's run or any cell's

    lines = []
    sweep.run_sweep(specs.load_spec(path), dry_run=True, echo=lines.append)
    assert any(line.startswith("WARNING: this machine would train the 2 cells left") and
               "will refuse to run them without --allow-precision-change" in line for line in lines), lines
    # Allowed, the sweep only says so; with the finished cell in this machine's precision, nothing.
    def warnings(**options):
        lines = []
        sweep.run_sweep(specs.load_spec(path), dry_run=True, echo=lines.append, **options)
        return [line for line in lines if line.startswith("WARNING")]

    allowed = warnings(allow_precision_change=True)
    assert len(allowed) == 1 and "will refuse" not in allowed[0], allowed
    mlflow.MlflowClient().set_tag(runs()[0].info.run_id, "precision", here)
    assert warnings() == []


def test_a_stopped_sweep_closes_the_runs_its_cells_could_not(mlflow_store):
    # A cell SIGKILLed when its grace ran out leaves its run RUNNING: the sweep closes it.
    client = mlflow.MlflowClient()
    exp = client.create_experiment("sweeps")
    parent = client.create_run(exp, run_name="sweep-t")
    cell = client.create_run(exp, run_name="cell", tags={"mlflow.parentRunId": parent.info.run_id})
    other = client.create_run(exp, run_name="not ours")  # another sweep's, say: left alone
    said: list[str] = []
    with pytest.raises(KeyboardInterrupt), sweep._close_cells_left_running("sweeps", parent.info.run_id, "t", [],
                                                                           said.append):
        raise KeyboardInterrupt
    assert said == ["sweep t stopped (SIGINT): 0 cells finished before the stop; a cell stopped in training keeps "
                    "its checkpoint: the same command runs the cells left, resuming it"]
    assert client.get_run(cell.info.run_id).info.status == "KILLED"
    assert "ended before it closed its run" in client.get_run(cell.info.run_id).data.tags["error"]
    assert client.get_run(other.info.run_id).info.status == "RUNNING"
