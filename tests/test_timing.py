"""The controlled timing pass: every finished run timed under the same conditions."""
from __future__ import annotations

import mlflow
import torch
from click.testing import CliRunner

from prunetrack import archive, cli, masking, timing
from prunetrack.config import JobConfig
from prunetrack.job import run_job
from tests.conftest import SMOKE


def _job(**overrides):
    return JobConfig.from_flat({**SMOKE, "train_subset": 200, "test_subset": 100, "batch_size": 100,
                                "experiment": "timed", **overrides})


def test_timing_pass_logs_median_spread_and_conditions_to_each_run(mlflow_store):
    ids = [run_job(_job(pruner="rand", compression=c)) for c in (2, 10)]
    seen = []
    timed = timing.time_runs("timed", rounds=3, batch_size=50, device="cpu", echo=seen.append)
    assert {t.run_id for t in timed} == set(ids) and all(len(t.times) == 3 for t in timed)
    assert any("round 3/3" in line for line in seen)
    client = mlflow.MlflowClient()
    for run_id in ids:
        run = client.get_run(run_id)
        m, tags = run.data.metrics, run.data.tags
        assert m["timed_test_time_min"] <= m["timed_test_time"] <= m["timed_test_time_max"]
        assert tags["timing.rounds"] == "3" and tags["timing.batch_size"] == "50"
        assert tags["timing.device"].startswith("cpu") and int(tags["timing.threads"]) >= 1
        assert tags["timing.precision"] in ("fp32", "bf16") and float(tags["timing.loadavg"]) >= 0
        assert run.info.status == "FINISHED"  # logging the times does not reopen the run

    # A study that grows: the next pass with --untimed times only the cell finished since.
    new = run_job(_job(pruner="rand", compression=5))
    result = CliRunner().invoke(cli.cli, ["time", "--experiment", "timed", "--rounds", "2", "--batch-size", "50",
                                          "--device", "cpu", "--untimed", "--settle", "0"])
    assert result.exit_code == 0, result.output
    assert "timing 1 run of" in result.output and client.get_run(new).data.tags["timing.rounds"] == "2"
    assert all(client.get_run(i).data.tags["timing.rounds"] == "3" for i in ids)  # left as they were
    result = CliRunner().invoke(cli.cli, ["time", "--experiment", "timed", "--untimed"])
    assert result.exit_code == 0 and "nothing to time" in result.output


def test_timing_command_refuses_an_experiment_without_runs(mlflow_store):
    run_job(_job())
    result = CliRunner().invoke(cli.cli, ["time", "--experiment", "nope"])
    assert result.exit_code == 1 and "no experiment named 'nope'" in result.output
    result = CliRunner().invoke(cli.cli, ["time", "--experiment", "timed", "--rounds", "0"])
    assert result.exit_code == 2 and "rounds" in result.output.lower()


def test_timing_bf16_runs_where_bf16_is_only_emulated_says_so(mlflow_store, monkeypatch):
    from prunetrack import training

    run_job(_job(pruner="rand", compression=2, precision="bf16"))
    for native in (False, True):
        monkeypatch.setattr(training, "native_bf16", lambda device, native=native: native)
        seen = []
        timing.time_runs("timed", rounds=1, batch_size=50, device="cpu", echo=seen.append)
        warned = [line for line in seen if line.startswith("WARNING: 1 run trained in bf16, which cpu (")]
        assert len(warned) == (0 if native else 1), seen


def test_one_precision_for_every_run_times_runs_trained_in_another_in_it(mlflow_store, monkeypatch):
    """A study whose cells trained in different precisions (or timed where bf16 is only
    emulated) is timed in one arithmetic with --precision; the tag says which."""
    from prunetrack import training

    monkeypatch.setattr(training, "native_bf16", lambda device: False)
    bf16, fp32 = (run_job(_job(pruner="rand", compression=2, precision=p)) for p in ("bf16", "fp32"))
    client = mlflow.MlflowClient()
    seen = []
    timing.time_runs("timed", rounds=1, batch_size=50, device="cpu", echo=seen.append)
    assert [client.get_run(i).data.tags["timing.precision"] for i in (bf16, fp32)] == ["bf16", "fp32"]
    assert any(line.startswith("WARNING: 1 run trained in bf16") and "--precision fp32" in line for line in seen)

    result = CliRunner().invoke(cli.cli, ["time", "--experiment", "timed", "--rounds", "1", "--batch-size", "50",
                                          "--device", "cpu", "--precision", "auto", "--settle", "0"])  # fp32: no native bf16
    assert result.exit_code == 0, result.output
    assert "trained in bf16" not in result.output
    assert [client.get_run(i).data.tags["timing.precision"] for i in (bf16, fp32)] == ["fp32", "fp32"]

    result = CliRunner().invoke(cli.cli, ["time", "--experiment", "timed", "--precision", "fp16"])
    assert result.exit_code == 2 and "'fp16' is not one of 'trained', 'auto', 'fp32', 'bf16'" in result.output


def test_runs_imported_without_masks_are_timed_under_their_layer_counts(mlflow_store, tmp_path):
    """An export carries no masks, so a study resumed on another machine has runs without
    them: each is timed under masks with its logged number of surviving weights in each
    layer (dense kernels take as long whichever weights are zero), and says so in a tag;
    a run with neither masks nor layers.json is named and left untimed."""
    original = run_job(_job(pruner="snip", compression=10))
    path = str(tmp_path / "runs.jsonl.gz")
    archive.export_runs("timed", path)
    archive.import_runs(path, experiment="copied")
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("copied").experiment_id, run_name="bare",
                          tags={"pruner": "rand", "model": "resnet20"}):
        mlflow.log_params({"dataset": "synthetic", "test_subset": 100})

    seen = []
    [copy] = timing.time_runs("copied", rounds=1, batch_size=50, device="cpu", echo=seen.append)
    logged = masking.load_masks(f"runs:/{original}")
    rebuilt = masking.get_masks(copy.net)
    assert {n: int(m.sum()) for n, m in rebuilt.items()} == {n: int(m.sum()) for n, m in logged.items()}
    assert any(not torch.equal(rebuilt[n].cpu(), logged[n]) for n in logged)  # the counts, not the places
    client = mlflow.MlflowClient()
    assert client.get_run(copy.run_id).data.tags["timing.masks"] == "layer counts"
    assert any(line.startswith("not timing bare (") and "neither masks.pt nor layers.json" in line for line in seen)
    assert any(line.startswith("1 run without masks (imported: exports carry none)") for line in seen)

    [own] = timing.time_runs("timed", rounds=1, batch_size=50, device="cpu", echo=lambda line: None)
    assert client.get_run(original).data.tags["timing.masks"] == "logged"
    assert all(torch.equal(m.cpu(), logged[n]) for n, m in masking.get_masks(own.net).items())


def test_timing_waits_for_the_load_a_stopped_job_leaves_to_fall(monkeypatch):
    loads, slept, seen = iter([3.0, 2.5, 1.6, 0.7, 0.2]), [], []
    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(timing.time, "sleep", slept.append)
    assert timing.settle(600, seen.append, poll_s=5) == 0.7  # the first below 0.5 per CPU
    assert slept == [5, 5, 5] and seen == ["load average 3.00: waiting up to 600 s for it to fall below 1.00"]
    # A load that does not fall: the wait ends at the limit, and the caller warns with that load.
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(timing.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (1.8, 0.0, 0.0))
    assert timing.settle(20, seen.append, poll_s=5) == 1.8
    assert timing.settle(0, seen.append) == 1.8 and len(seen) == 2  # 0: no wait, no message
