"""Shared fixtures: a fresh MLflow store per test, a real `mlflow server` on loopback,
and small CPU settings so the suite runs in minutes on two cores."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers run side by side, one per core: one thread each, and for the jobs they start
    # (read by torch at import), so that they share the cores without oversubscribing them.
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after the thread count)

torch.set_num_threads(min(2, torch.get_num_threads()))

# A shell starts background commands (`... &`, nohup) with Ctrl-C ignored, and an ignored
# signal stays ignored through exec: the interruption tests, which send SIGINT to this
# process and to the processes it starts, would fail however prunetrack behaves. Take
# Ctrl-C back as Python has it in the foreground; the processes tests start inherit that.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

# The xdist group of the tests that start many processes at once or use the session's
# `mlflow server`: one worker runs them all, one after another (see pyproject's addopts).
CROWD = "crowd"

def speed_record(cfg, epoch_times: list[float], test_rate: float = 100.0, pruning_time: float = 1.0,
                 precision: str | None = None) -> dict:
    """An earlier run of `cfg`'s training on this CPU as tracking.speed_records gives it: what
    the estimates read (its epochs, test rate and pruning time) under the tags and params
    that match `cfg` (precision: the one `cfg` resolves to here, unless given)."""
    from prunetrack import job, training

    device = job.resolve_device("cpu")
    t, d = cfg.train, cfg.data
    return {"tags": {"model": cfg.model.model, "dataset": d.dataset, "device": job.device_name(device),
                     "pruner": cfg.prune.pruner,
                     "precision": precision or training.resolve_precision(t.precision, device)},
            "params": {"batch_size": str(t.batch_size), "test_batch_size": str(t.test_batch_size),
                       "optimizer": t.optimizer, "train_subset": str(d.train_subset),
                       "test_subset": str(d.test_subset), "iterations": "1"},
            "epoch_times": list(epoch_times), "metrics": {"test_images_per_sec": test_rate,
                                                          "pruning_time": pruning_time}}


# A job small enough for seconds on a CPU: synthetic data, a tiny ResNet.
SMOKE = dict(dataset="synthetic", model="resnet20", post_epochs=1, batch_size=128, test_batch_size=128,
             device="cpu")


@pytest.fixture(scope="session", autouse=True)
def checkpoints_of_the_session(tmp_path_factory):
    """Jobs that a test starts outside `mlflow_store` checkpoint into this session's folder,
    not the user's cache, where two test processes could meet the same configuration."""
    os.environ["PRUNETRACK_CHECKPOINT_DIR"] = str(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def new_store(tmp_path_factory):
    """`new_store(path)` makes an empty SQLite tracking store at `path` and returns its
    URI. MLflow takes seconds to create one (it runs every schema migration), so the first
    is made by MLflow and the others are copies of it, with the Default experiment's
    artifacts under ./mlruns of the store's folder, as if MLflow had created it there."""
    from prunetrack import store

    template = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    store.prepare_store(f"sqlite:///{template}")

    def make(path) -> str:
        shutil.copyfile(template, path)
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       (os.path.join(os.path.dirname(os.path.abspath(path)), "mlruns", "0"),))
        return f"sqlite:///{path}"

    return make


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, new_store):
    """A fresh embedded SQLite tracking store (artifacts under tmp_path/mlruns), used
    through MLFLOW_TRACKING_URI exactly as a user would point prunetrack at a store."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = new_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Checkpoints go beside the store, not into the user's cache.
    monkeypatch.setenv("PRUNETRACK_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    for var in _MLFLOW_RUN_CONTEXT:
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(uri)
    _forget_active_experiment()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    _forget_active_experiment()
    # mlflow.set_experiment exports the experiment id for child processes: do not leak it.
    for var in _MLFLOW_RUN_CONTEXT:
        os.environ.pop(var, None)


def _forget_active_experiment():
    """mlflow.set_experiment remembers the experiment id in-process; a fresh store
    has no such experiment, so every test starts without one."""
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None


_MLFLOW_RUN_CONTEXT = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, proxied artifact store) on 127.0.0.1.
    Yields its URL; stopped at the end of the session."""
    from prunetrack.servers import mlflow_server as serve

    root = tmp_path_factory.mktemp("server")
    with serve(f"sqlite:///{root}/server.db", ["--artifacts-destination", str(root / "artifacts")]) as url:
        yield url


@pytest.fixture
def cifar10_dir(tmp_path_factory):
    """The shared offline CIFAR-10 copy, materialized (a small subset) in the official
    layout; the test is skipped where the shared copy is absent."""
    script = os.path.join(SHARED_DATA, "cifar10_jpeg.py")
    if not os.path.exists(script):
        pytest.skip("shared CIFAR-10 copy not available")
    dest = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, script, "materialize", str(dest), "--train", "2000", "--test", "500"],
                   check=True, capture_output=True)
    return str(dest)
