"""Processes prunetrack starts and stops: the loopback `mlflow server` that concurrent
cells log to, and the stopping of a child together with whatever it started itself.

Children are started in a session of their own, so a Ctrl-C in the terminal reaches only
the sweep, which then stops its cells before the server they log to.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import mlflow


def stop(*procs: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to every process's group at once, then SIGKILL to those still there after
    `grace` seconds. A child started with start_new_session leads its own group, which
    holds what it started itself (`mlflow server` runs uvicorn in a process of its own)."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone, or not ours: the process alone
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifact_args: list[str]):
    """Run a real `mlflow server` on a free loopback port, yield its URL once it answers
    /health, and stop it when the block ends. Its log is kept (and named in the error)
    only when it fails to start. Tracking only: MLflow's background job runner (five
    worker processes, for its GenAI features) would take CPU from the jobs it serves."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    log = tempfile.NamedTemporaryFile("w+", prefix="mlflow-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_store_uri, *artifact_args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    keep_log = True  # until the server is up: its log explains why it is not
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the mlflow server for {backend_store_uri} exited:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the mlflow server for {backend_store_uri} did not answer within 120 s "
                                   f"(its log: {log.name})")
            time.sleep(0.3)
        keep_log = False
        yield url
    finally:
        stop(proc)
        log.close()
        if not keep_log:
            os.unlink(log.name)


@contextlib.contextmanager
def tracking_server(needed: bool):
    """Yield the tracking URI that concurrent jobs should log to.

    Many processes writing one SQLite file directly fail with "database is locked", so
    when `needed` and the store is SQLite, a loopback `mlflow server` is started on the
    same database (artifacts stay where the embedded store puts them, ./mlruns) and this
    process and its children use it until the block ends. Any other URI is yielded as is.
    """
    uri = mlflow.get_tracking_uri()
    if not needed or not uri.startswith("sqlite:"):
        yield uri
        return
    with mlflow_server(uri, ["--default-artifact-root", os.path.abspath("mlruns"), "--no-serve-artifacts"]) as url:
        print(f"tracking server {url} (for {uri})", flush=True)
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = url
        mlflow.set_tracking_uri(url)
        try:
            yield url
        finally:
            mlflow.set_tracking_uri(uri)
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = previous
