"""tracking: how a run opens and closes, what log_config writes, the look-ups a sweep
relies on; servers: stopping a child with what it started."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
import yaml

from prunetrack import interrupts, servers, store, tracking


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def artifacts(run_id: str) -> set[str]:
    return {a.path for a in client().list_artifacts(run_id)}


# ---------------------------------------------------------------------------- closing a run

def test_job_run_ends_finished_on_success(mlflow_store):
    with tracking.job_run("t", "ok") as run:
        tracking.log_metrics({"x": 1})
    assert client().get_run(run.info.run_id).info.status == "FINISHED"
    assert mlflow.active_run() is None


def test_job_run_ends_failed_with_the_error_on_an_exception(mlflow_store):
    with pytest.raises(ValueError, match="bad value"):
        with tracking.job_run("t", "bad") as run:
            raise ValueError("bad value")
    closed = client().get_run(run.info.run_id)
    assert closed.info.status == "FAILED"
    assert closed.data.tags["error"] == "ValueError: bad value"
    assert "error.txt" in artifacts(run.info.run_id)
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error.txt")
    assert "Traceback" in text and "bad value" in text


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_job_run_ends_killed_on_ctrl_c_and_sigterm(mlflow_store, how):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with tracking.job_run("t", how) as run:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)  # the handler raises long before this ends
            raise KeyboardInterrupt
    closed = client().get_run(run.info.run_id)
    assert closed.info.status == "KILLED"
    assert closed.data.tags["error"].startswith("Terminated" if how == "sigterm" else "KeyboardInterrupt")
    assert closed.data.tags["interrupted"] == ("SIGTERM" if how == "sigterm" else "SIGINT")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the job's only while its run is open


def test_a_second_stop_signal_does_not_interrupt_the_unwinding_of_the_first():
    """Ctrl-C, then `mlflow run`'s SIGTERM while the job unwinds (closing a database
    session, say): the cleanup finishes, and the job stops for the first signal."""
    cleaned = []
    with pytest.raises(KeyboardInterrupt) as e:
        with interrupts.stoppable():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(10)  # the handler raises long before this ends
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler runs here, and must not raise
                cleaned.append("done")
    assert cleaned == ["done"] and type(e.value) is KeyboardInterrupt
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_run_that_mlflow_turned_failed_after_an_interruption_counts_as_killed(mlflow_store):
    with pytest.raises(KeyboardInterrupt):
        with tracking.job_run("t", "ctrl-c") as run:
            raise KeyboardInterrupt
    client().set_terminated(run.info.run_id, "FAILED")  # what `mlflow run` does next
    assert tracking.outcome(client().get_run(run.info.run_id)) == "KILLED"
    with pytest.raises(ValueError):
        with tracking.job_run("t", "bad") as failed:
            raise ValueError("bad")
    assert tracking.outcome(client().get_run(failed.info.run_id)) == "FAILED"


@pytest.fixture
def parent_pid(monkeypatch):
    """Set PRUNETRACK_PARENT_PID (the parent a job watches) for one test."""
    def set_pid(pid: int):
        monkeypatch.setenv(interrupts.PARENT_PID_ENV, str(pid))
        interrupts.watched_parent.cache_clear()
    yield set_pid
    monkeypatch.delenv(interrupts.PARENT_PID_ENV, raising=False)
    interrupts.watched_parent.cache_clear()


def test_job_run_ends_killed_within_a_second_when_its_parent_dies(mlflow_store, parent_pid):
    parent_pid(os.getppid())
    assert not interrupts.parent_died()  # our parent is alive
    with pytest.raises(interrupts.ParentDied, match=rf"the sweep process \(pid {os.getpid()}\) died"):
        with tracking.job_run("t", "orphan") as run:
            parent_pid(os.getpid())  # a pid that is not our parent's: as if the parent had just died
            assert interrupts.parent_died()
            start = time.monotonic()
            time.sleep(30)  # the watcher interrupts this
    assert time.monotonic() - start < 5
    closed = client().get_run(run.info.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["interrupted"] == "parent-died"


def test_a_broken_pipe_to_a_dead_parent_closes_the_run_as_killed(mlflow_store, parent_pid):
    parent_pid(os.getppid())
    # A print to the dead sweep's pipe can fail before the watcher notices: the same event.
    with pytest.raises(BrokenPipeError):
        with tracking.job_run("t", "orphan") as run:
            parent_pid(os.getpid())  # as if the parent had just died
            raise BrokenPipeError(32, "Broken pipe")
    closed = client().get_run(run.info.run_id)
    assert closed.info.status == "KILLED"
    assert closed.data.tags["error"].startswith(f"ParentDied: the sweep process (pid {os.getpid()}) died")
    assert "BrokenPipeError" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/error.txt")


def test_tags_from_the_environment_are_set_as_the_run_starts(mlflow_store, monkeypatch):
    monkeypatch.setenv(tracking.RUN_TAGS_ENV, json.dumps({"sweep": "s", "cell": "seed=0", "mlflow.parentRunId": "p"}))
    with pytest.raises(RuntimeError):
        with tracking.job_run("t", "r", tags={"config_hash": "abc"}) as run:
            raise RuntimeError("fails at once")
    tags = client().get_run(run.info.run_id).data.tags
    assert {k: tags[k] for k in ("sweep", "cell", "mlflow.parentRunId", "config_hash")} == \
        {"sweep": "s", "cell": "seed=0", "mlflow.parentRunId": "p", "config_hash": "abc"}
    monkeypatch.setenv(tracking.RUN_TAGS_ENV, "[1]")
    with pytest.raises(ValueError, match="must be a JSON object of tags"):
        with tracking.job_run("t", "r"):
            pass


# ---------------------------------------------------------------------------- what is logged

def test_log_config_keeps_logged_params_and_adds_resolved_ones(mlflow_store):
    with pytest.raises(KeyboardInterrupt):
        with tracking.job_run("t", "r") as run:
            mlflow.log_params({"iterations": 0, "compression": "10"})  # as `mlflow run` logs its parameters
            raise KeyboardInterrupt
    flat = {"iterations": 100, "compression": 10.0, "pruner": "mag"}
    with tracking.job_run("t", "r", resume_run_id=run.info.run_id) as resumed:
        tracking.log_config(flat)
    assert resumed.info.run_id == run.info.run_id
    # MLflow refuses to change a param: a different value goes beside it; "10" and 10.0 are the same.
    assert client().get_run(run.info.run_id).data.params == {
        "iterations": "0", "iterations_resolved": "100", "compression": "10", "pruner": "mag"}
    assert yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")) == flat


def test_log_to_finished_run_leaves_it_finished(mlflow_store):
    with tracking.job_run("t", "r") as run:
        pass
    ended = client().get_run(run.info.run_id).info.end_time
    tracking.log_to_finished_run(run.info.run_id, {"timed_test_time": 0.5}, {"timing.rounds": 3})
    after = client().get_run(run.info.run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", ended)
    assert after.data.metrics["timed_test_time"] == 0.5 and after.data.tags["timing.rounds"] == "3"


def test_log_table_writes_what_mlflow_log_table_writes_without_pandas(mlflow_store, monkeypatch):
    rows = [{"layer": "conv1", "params": 1728, "density": 0.1, "note": None},
            {"layer": "fc", "params": 5120, "density": 0.25, "note": "last"}]
    with tracking.job_run("t", "mlflow's") as theirs:
        mlflow.log_table({c: [r[c] for r in rows] for c in rows[0]}, "layers.json")
        mlflow.log_table({"a": [1]}, "other.json")
    monkeypatch.setitem(sys.modules, "pandas", None)  # as with mlflow-skinny: `import pandas` fails
    with tracking.job_run("t", "ours") as ours:
        tracking.log_table(rows, "layers")
        tracking.log_table([{"a": 1}], "other")
        tracking.log_table(rows, "layers")  # logged again: replaced, listed once
    for run in (theirs, ours):
        assert mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/layers.json") == {
            "columns": ["layer", "params", "density", "note"],
            "data": [["conv1", 1728, 0.1, None], ["fc", 5120, 0.25, "last"]]}
    tags = [json.loads(client().get_run(r.info.run_id).data.tags[tracking.LOGGED_ARTIFACTS]) for r in (theirs, ours)]
    assert tags[0] == tags[1] == [{"path": "layers.json", "type": "table"}, {"path": "other.json", "type": "table"}]


# ---------------------------------------------------------------------------- experiments and the store

def test_experiment_id_creates_once_and_refuses_a_deleted_one(mlflow_store):
    first = store.experiment_id("e")
    assert store.experiment_id("e") == first
    assert [e.experiment_id for e in client().search_experiments() if e.name == "e"] == [first]
    client().delete_experiment(first)
    with pytest.raises(store.TrackingError, match=rf"experiment 'e' is deleted; restore it \(mlflow experiments "
                                                     rf"restore --experiment-id {first}\) or choose another name"):
        store.experiment_id("e")


def test_check_tracking_on_a_closed_port_names_the_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    port = servers._free_port()  # free: nothing listens there
    with pytest.raises(store.TrackingError, match=rf"http://127.0.0.1:{port} does not answer"):
        store.check_tracking(f"http://127.0.0.1:{port}", timeout=2)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the fast settings were for the check only


def test_check_tracking_gives_up_after_one_request_to_a_failing_server():
    """MLflow retries a 503 with back-off for minutes; the check asks once and says so."""
    import http.server
    import threading

    requests = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(store.TrackingError, match="does not answer"):
            store.check_tracking(f"http://127.0.0.1:{server.server_port}", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert len(requests) == 1, requests


# ---------------------------------------------------------------------------- look-ups for sweeps

def test_finished_configs_maps_config_and_pretrain_hashes(mlflow_store):
    assert tracking.finished_configs("none") == {}
    exp = client().create_experiment("s")

    def run(status: str, **tags) -> str:
        run_id = client().create_run(exp, tags=tags).info.run_id
        if status != "RUNNING":
            client().set_terminated(run_id, status)
        return run_id

    prune = run("FINISHED", config_hash="c1")
    pre = run("FINISHED", pretrain_hash="p1")
    with mlflow.start_run(run_id=pre):
        tracking.log_weights({"w": torch.ones(2)})
    run("FAILED", config_hash="c2")
    run("RUNNING", config_hash="c3")
    run("FINISHED")  # no hash: not a job's run (a sweep's parent)
    assert tracking.finished_configs("s") == {"c1": prune, "p1": pre}


def test_a_pretraining_without_its_weights_is_not_one_to_start_from(mlflow_store):
    """An imported pre-training finished elsewhere, but exports carry no weights: a
    Magnitude job cannot start from it, so the sweep runs the pre-training again here."""
    exp = client().create_experiment("s")
    imported = client().create_run(exp, tags={"pretrain_hash": "p1"}).info.run_id
    client().set_terminated(imported, "FINISHED")
    assert tracking.finished_configs("s") == {}
    assert tracking.find_pretrain("s", "p1") is None
    here = client().create_run(exp, tags={"pretrain_hash": "p1"}).info.run_id
    with mlflow.start_run(run_id=here):
        tracking.log_weights({"w": torch.ones(2)})
    assert tracking.finished_configs("s") == {"p1": here}
    assert tracking.find_pretrain("s", "p1") == here


def test_find_cell_run_by_tags(mlflow_store):
    assert tracking.find_cell_run("none", "sw", "p", "config_hash", "h") is None
    exp = client().create_experiment("s")
    t0 = int(time.time() * 1000)

    def run(start: int, parent: str, status: str, sweep: str = "sw", **tags) -> str:
        run_id = client().create_run(exp, start_time=t0 + start,
                                     tags={"sweep": sweep, "mlflow.parentRunId": parent, **tags}).info.run_id
        if status != "RUNNING":
            client().set_terminated(run_id, status)
        return run_id

    # Created by sweep p1, killed, then resumed by sweep p2, which re-tagged it as it reopened it.
    resumed = run(0, "p1", "FINISHED", config_hash="h")
    client().set_tag(resumed, "mlflow.parentRunId", "p2")
    run(1, "p1", "FAILED", config_hash="h")             # a later attempt under p1: not p2's
    run(2, "p2", "FINISHED", sweep="other", config_hash="h")  # another sweep's
    assert tracking.find_cell_run("s", "sw", "p2", "config_hash", "h") == resumed
    pre = run(3, "p2", "FINISHED", pretrain_hash="h")
    assert tracking.find_cell_run("s", "sw", "p2", "pretrain_hash", "h") == pre
    # No run with this parent: a run killed while being reopened (still RUNNING, old parent), if any.
    assert tracking.find_cell_run("s", "sw", "p3", "config_hash", "h") is None
    stuck = run(4, "p1", "RUNNING", config_hash="h")
    assert tracking.find_cell_run("s", "sw", "p3", "config_hash", "h") == stuck


def test_end_if_running_closes_only_a_running_run(mlflow_store):
    exp = client().create_experiment("s")
    run_id = client().create_run(exp).info.run_id
    assert tracking.end_if_running(run_id, "FAILED", "killed by the OOM killer")
    closed = client().get_run(run_id)
    assert (closed.info.status, closed.data.tags["error"]) == ("FAILED", "killed by the OOM killer")
    assert not tracking.end_if_running(run_id, "KILLED", "again")
    assert client().get_run(run_id).info.status == "FAILED"


# ---------------------------------------------------------------------------- processes

def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_stop_ends_a_child_and_what_it_started():
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    grandchild = int(proc.stdout.readline())
    servers.stop(proc, grace=10)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGTERM
    deadline = time.time() + 10
    while _running(grandchild):
        assert time.time() < deadline, "the child's own child survived"
        time.sleep(0.1)


def test_only_names_mlflow_made_up_are_replaced():
    assert tracking._generated_name("bald-hound-474")
    assert not tracking._generated_name("vgg16-mag-10x-s0")
    assert not tracking._generated_name("my-own-1")  # the user's --run-name: kept
    assert not tracking._generated_name(None)
