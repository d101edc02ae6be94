"""Export and import keep a sweep's parent/child links and never leave runs RUNNING.
(The round trip of real job runs through the report is in test_report.py.)"""
from __future__ import annotations

import json
import os

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from prunetrack import archive, cli


def test_parent_links_point_at_the_new_runs_and_running_runs_stay_behind(mlflow_store, tmp_path, new_store):
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

    copy_uri = new_store(tmp_path / "copy.db")
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


def _export_two_runs(path: str) -> None:
    client = MlflowClient()
    exp = client.create_experiment("two")
    for name in ("a", "b"):
        run = client.create_run(exp, run_name=name)
        client.log_metric(run.info.run_id, "test_loss", 1.0, step=1)
        client.set_terminated(run.info.run_id, "FINISHED")
    archive.export_runs("two", path)


def _refused(path: str, match: str) -> None:
    with pytest.raises(archive.ArchiveError, match=match):
        archive.import_runs(path, experiment="copied")
    assert MlflowClient().get_experiment_by_name("copied") is None  # nothing written


def test_export_cut_short_is_refused_whole(mlflow_store, tmp_path):
    path = tmp_path / "runs.jsonl"
    _export_two_runs(str(path))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]))  # the header and the first run: cut at a line boundary
    _refused(str(path), r"the header announces 2 runs but the file holds 1")


def test_bad_records_are_refused_naming_the_line(mlflow_store, tmp_path):
    path = tmp_path / "runs.jsonl"
    _export_two_runs(str(path))
    header, first, second = path.read_text().splitlines()
    record = json.loads(second)
    path.write_text("\n".join([header, first, json.dumps({**record, "status": "RUNNING"})]) + "\n")
    _refused(str(path), r"line 3: status 'RUNNING' is not one of FINISHED, FAILED, KILLED")
    del record["params"], record["tags"]
    path.write_text("\n".join([header, first, json.dumps(record)]) + "\n")
    _refused(str(path), r"line 3: the run record has no params, tags")


def test_truncated_gzip_export_is_named(mlflow_store, tmp_path):
    path = tmp_path / "runs.jsonl.gz"
    _export_two_runs(str(path))
    path.write_bytes(path.read_bytes()[:-40])
    _refused(str(path), r"runs.jsonl.gz is a truncated or corrupt gzip file")
    result = CliRunner().invoke(cli.cli, ["import", str(path)])
    assert result.exit_code == 1 and "truncated or corrupt gzip file" in result.output
    assert "Aborted" not in result.output


def test_failed_export_leaves_the_earlier_file_as_it_was(mlflow_store, tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl.gz"
    _export_two_runs(str(path))
    good = path.read_bytes()
    with pytest.raises(archive.ArchiveError, match="no experiment named 'absent'"):
        archive.export_runs("absent", str(path))

    def broken(*args):
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(archive, "_artifact_texts", broken)  # fails after the header is written
    with pytest.raises(ConnectionError):
        archive.export_runs("two", str(path))
    assert path.read_bytes() == good
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]  # nothing left behind


def test_a_run_deleted_here_stays_deleted_when_its_export_is_imported_again(mlflow_store, tmp_path):
    """A study deletes a superseded run, then resumes by importing its committed export, made
    before the deletion: the run must not come back (nor in a second copy)."""
    client = MlflowClient()
    exp = client.create_experiment("study")
    ids = []
    for name in ("old-cell", "cell"):
        run = client.create_run(exp, run_name=name)
        client.set_terminated(run.info.run_id, "FINISHED")
        ids.append(run.info.run_id)
    path = str(tmp_path / "runs.jsonl")
    archive.export_runs("study", path)
    client.delete_run(ids[0])
    result = CliRunner().invoke(cli.cli, ["import", path])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("imported 0 runs into experiment 'study' (2 imported before, skipped; 1 of "
                                          "them deleted here, left deleted: `mlflow runs restore --run-id ID` brings "
                                          "one back)")
    assert [r.info.run_id for r in client.search_runs([exp])] == [ids[1]]
    assert len(client.search_runs([exp], run_view_type=ViewType.ALL)) == 2
    archive.export_runs("study", path)  # the export made now leaves it out
    assert [json.loads(line)["run_id"] for line in open(path) if '"run_id"' in line] == [ids[1]]


def test_importing_an_export_back_into_its_own_store_adds_nothing(mlflow_store, tmp_path, new_store):
    """A study exports its store and, next time, imports the committed file first: the runs
    already there (made there, or imported before) must not be duplicated, and an export of
    imported runs keeps pointing at the original runs."""
    client = MlflowClient()
    exp = client.create_experiment("study")
    run = client.create_run(exp, run_name="cell")
    client.log_metric(run.info.run_id, "test_accuracy", 90.0)
    client.set_terminated(run.info.run_id, "FINISHED")
    path = str(tmp_path / "runs.jsonl")
    archive.export_runs("study", path)
    assert (archive.import_runs(path).imported, archive.import_runs(path).skipped) == (0, 1)
    assert len(client.search_runs([exp])) == 1

    mlflow.set_tracking_uri(new_store(tmp_path / "second.db"))
    try:
        assert archive.import_runs(path).imported == 1
        again = str(tmp_path / "again.jsonl")
        archive.export_runs("study", again)
        mlflow.set_tracking_uri(new_store(tmp_path / "third.db"))
        assert archive.import_runs(path).imported == 1
        assert (archive.import_runs(again).imported, archive.import_runs(again).skipped) == (0, 1)
        [copy] = mlflow.search_runs(experiment_names=["study"], output_format="list")
        assert copy.data.tags[archive.IMPORTED_FROM] == run.info.run_id
    finally:
        mlflow.set_tracking_uri(mlflow_store)
