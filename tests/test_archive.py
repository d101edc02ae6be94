"""Export and import keep a sweep's parent/child links and never leave runs RUNNING.
(The round trip of real job runs through the report is in test_report.py.)"""
from __future__ import annotations

import mlflow
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from prunetrack import archive


def test_parent_links_point_at_the_new_runs_and_running_runs_stay_behind(mlflow_store, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("sweeps")
    parent = client.create_run(exp, run_name="sweep-demo")
    child = client.create_run(exp, run_name="cell", tags={"mlflow.parentRunId": parent.info.run_id})
    client.log_metric(child.info.run_id, "test_loss", 1.5, step=1)
    client.log_metric(child.info.run_id, "test_loss", 1.2, step=2)
    client.set_terminated(child.info.run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    client.create_run(exp, run_name="still-running")  # must not be exported

    path = str(tmp_path / "runs.jsonl")
    summary = archive.export_runs("sweeps", path)
    assert (summary.runs, summary.skipped_running) == (2, 1)

    copy_uri = f"sqlite:///{tmp_path}/copy.db"
    mlflow.set_tracking_uri(copy_uri)
    try:
        result = archive.import_runs(path, experiment="copied")
        assert (result.imported, result.skipped) == (2, 0)
        runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["copied"], output_format="list")}
        assert set(runs) == {"sweep-demo", "cell"}
        assert runs["cell"].data.tags["mlflow.parentRunId"] == runs["sweep-demo"].info.run_id
        assert all(r.info.status == "FINISHED" for r in runs.values())
        history = MlflowClient(copy_uri).get_metric_history(runs["cell"].info.run_id, "test_loss")
        assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.2)]
    finally:
        mlflow.set_tracking_uri(mlflow_store)


def test_import_into_a_deleted_experiment_is_refused(mlflow_store, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("gone")
    run = client.create_run(exp, run_name="r")
    client.set_terminated(run.info.run_id, "FINISHED")
    path = str(tmp_path / "runs.jsonl")
    archive.export_runs("gone", path)
    client.delete_experiment(exp)
    with pytest.raises(archive.ArchiveError, match=r"experiment 'gone' is deleted: restore it .* or import with --experiment"):
        archive.import_runs(path)
    assert len(client.search_runs([exp], run_view_type=ViewType.ALL)) == 1  # nothing added
