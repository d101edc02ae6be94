"""The controlled timing pass: every finished run timed under the same conditions."""
from __future__ import annotations

import mlflow
from click.testing import CliRunner

from prunetrack import cli, timing
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
                                          "--device", "cpu", "--untimed"])
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
