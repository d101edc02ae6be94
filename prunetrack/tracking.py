"""Everything prunetrack writes to MLflow, in one place.

A job opens its run with `job_run` (which also picks up the run that `mlflow run`
created, through MLFLOW_RUN_ID) and logs through the helpers below. The run ends
FINISHED, or FAILED with the error as a tag and the traceback as `error.txt`
(KILLED on Ctrl-C or SIGTERM), never left RUNNING.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import traceback
import urllib.parse
from typing import Any

import mlflow
import torch
import yaml

from prunetrack import masking


def git_commit() -> str:
    """The commit of the prunetrack checkout, with '-dirty' for uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run is closed as KILLED and the command aborts."""


def _raise_terminated(signum, frame):
    raise _Terminated(f"terminated by signal {signum}")


# Tags a parent process (a sweep) asks every run it starts to carry, as a JSON object
# (e.g. {"mlflow.parentRunId": ..., "sweep": ..., "cell": ...}).
RUN_TAGS_ENV = "PRUNETRACK_RUN_TAGS"


def env_tags() -> dict[str, str]:
    raw = os.environ.get(RUN_TAGS_ENV)
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{RUN_TAGS_ENV} must be a JSON object of tags, got {raw!r} ({e})") from None
    if not isinstance(tags, dict):
        raise ValueError(f"{RUN_TAGS_ENV} must be a JSON object of tags, got {raw!r}")
    return {str(k): str(v) for k, v in tags.items()}


def experiment_id(name: str) -> str:
    """The id of the active experiment `name`, created if it does not exist. Runs are
    started with this id, not through mlflow.set_experiment, whose look-up-then-create
    races when several jobs start at once (a loser's run landed in Default)."""
    client = mlflow.MlflowClient()
    for _ in range(5):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage != "active":
                raise TrackingError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore "
                                    f"--experiment-id {exp.experiment_id}) or choose another name")
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except mlflow.exceptions.MlflowException:  # another job created it meanwhile: look it up again
            continue
    raise TrackingError(f"cannot create or find experiment {name!r} at {public_uri(mlflow.get_tracking_uri())}")


def resumable(run_id: str | None) -> str | None:
    """`run_id` if that run still exists and is not FINISHED (it can take more epochs)."""
    if not run_id:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.status == "FINISHED":
        return None
    return run_id


@contextlib.contextmanager
def job_run(experiment: str, run_name: str, tags: dict[str, Any] | None = None, resume_run_id: str | None = None):
    """The MLflow run of one job (or sweep). Under `mlflow run` the run already exists (its
    id is in MLFLOW_RUN_ID) and its experiment and name are mlflow's; with `resume_run_id`
    that run is reopened (status back to RUNNING); otherwise we create one. `tags` and
    those in PRUNETRACK_RUN_TAGS are set as the run starts, so that even a run that fails
    at once is attributed to its sweep."""
    tags = {**env_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    previous = None
    # Installed before the run exists, so a SIGTERM that arrives while it is being
    # created still closes it (as KILLED) instead of leaving it RUNNING.
    with contextlib.suppress(ValueError):  # not in the main thread
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if os.environ.get("MLFLOW_RUN_ID"):
            run = mlflow.start_run(tags=tags or None)
        elif resume_run_id:
            run = mlflow.start_run(run_id=resume_run_id, tags=tags or None)
        else:
            run = mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name, tags=tags or None)
        yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, _Terminated)) else "FAILED"
        if mlflow.active_run():
            with contextlib.suppress(Exception):  # a dead tracking server must not hide the real error
                mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:4000])
                mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run(status)
        raise
    else:
        mlflow.end_run("FINISHED")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which `key` was logged in a run (to resume without duplicates)."""
    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


def find_pretrain(experiment: str, pretrain_hash: str) -> str | None:
    """The id of a FINISHED pre-training run with this hash in `experiment`, if any."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"attributes.status = 'FINISHED' and "
                              f"tags.pretrain_hash = '{pretrain_hash}'", max_results=1,
                              order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def log_weights(state: dict[str, torch.Tensor], name: str = "weights.pt") -> None:
    """A model's weights (a state dict, on the CPU) as an artifact."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
        mlflow.log_artifact(path)


def load_weights(source: str) -> dict[str, torch.Tensor]:
    """Weights logged by `log_weights`: from a run id, `runs:/<run_id>` (its weights.pt),
    any artifact URI of such a file, or a local path."""
    if os.path.isfile(source):
        path = source
    else:
        uri = source if "/" in source or ":" in source else f"runs:/{source}"
        if not uri.rstrip("/").endswith(".pt"):
            uri = uri.rstrip("/") + "/weights.pt"
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=uri)
        except Exception as e:
            raise ValueError(f"cannot load weights from {source!r} ({type(e).__name__}: {str(e)[:300]}); "
                             f"init_from takes a run id, runs:/<run_id> of a run that logged weights.pt, or "
                             f"a path to such a file") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{source!r} does not hold a state dict of weights")
    return state


def _same(logged: str, value: Any) -> bool:
    if logged == str(value):
        return True
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return logged.lower() == str(value).lower()


def log_config(flat: dict[str, Any]) -> None:
    """The resolved configuration as params, and as `config.yaml`.

    `mlflow run` has already logged the entry point's parameters as it received them,
    and MLflow refuses to change a param. A key already logged with the same meaning
    ("10" for 10.0) is left alone; one whose value was resolved to something else
    (iterations 0 -> 100) is logged again as `<key>_resolved`.
    """
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    params = {}
    for key, value in flat.items():
        if key not in logged:
            params[key] = value
        elif not _same(logged[key], value):
            params[f"{key}_resolved"] = value
    mlflow.log_params(params)
    mlflow.log_text(yaml.safe_dump(flat, sort_keys=False), "config.yaml")


def log_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_masks(masks: dict[str, torch.Tensor]) -> None:
    """Log the masks as `masks.pt` (one bit per weight); `prunetrack.load_masks`
    reads them back from `runs:/<run_id>`."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "masks.pt")
        masking.save_masks(masks, path)
        mlflow.log_artifact(path)


def log_table(rows: list[dict[str, Any]], name: str) -> None:
    """A table the MLflow UI shows as one (artifact `<name>.json`)."""
    columns = list(rows[0]) if rows else []
    mlflow.log_table({c: [r[c] for r in rows] for c in columns}, f"{name}.json")


def log_dict(obj: dict, name: str) -> None:
    mlflow.log_dict(obj, name)


def log_figure(figure, name: str) -> None:
    """A matplotlib figure as an image artifact (`name`, e.g. `weight_histograms.png`)."""
    mlflow.log_figure(figure, name)


def log_text(text: str, name: str) -> None:
    mlflow.log_text(text, name)


# ---------------------------------------------------------------------------- reading back

# Runs that are not prune jobs carry this tag (the report's own run: "report"), so that
# whatever reads prune runs back (the report, export) can skip them.
KIND_TAG = "prunetrack.kind"


class TrackingError(RuntimeError):
    """A tracking problem the user can fix: a server that does not answer, a wrong experiment."""


def public_uri(uri: str) -> str:
    """The tracking URI without any user:password."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking(uri: str, timeout: int = 5) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer; MLflow's own
    defaults retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout)):
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:
            reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise TrackingError(f"the tracking server at {public_uri(uri)} does not answer ({reason}). "
                                f"Start it, or point MLFLOW_TRACKING_URI at a running one.") from None


def prepare_store(uri: str | None = None) -> None:
    """Make the tracking store ready before a job touches it: a server must answer
    (check_tracking), and a SQLite store is initialized by one process at a time.

    MLflow creates a SQLite store's tables and runs its migrations the first time a
    process opens it; several jobs started together on a file that does not exist yet
    all do so at once and leave it broken. So the first access happens here, under an
    exclusive lock on `<db>.lock` beside the database; later jobs find it ready."""
    uri = uri or mlflow.get_tracking_uri()
    check_tracking(uri)
    if not uri.startswith("sqlite:"):
        return
    import fcntl

    import sqlalchemy.engine

    path = sqlalchemy.engine.make_url(uri).database
    if not path or path == ":memory:" or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return  # nothing to share, or a folder that does not exist: MLflow's own error says so
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        try:
            mlflow.MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:
            if not any(s in str(e) for s in ("_alembic_tmp_", "already exists", "alembic_version")):
                raise
            reason = str(e).splitlines()[0][:300]
            raise TrackingError(
                f"the tracking database {os.path.abspath(path)} was left half-initialized ({reason}), e.g. by "
                f"jobs that created it at the same time. If it holds no runs, delete it and start again with a "
                f"fresh file; otherwise drop the leftover _alembic_tmp_* table (sqlite3 {path} \".tables\", "
                f"then DROP TABLE _alembic_tmp_<name>) and run `mlflow db upgrade {uri}`.") from None


def find_experiment(name: str):
    """The active experiment `name`; TrackingError listing the existing ones otherwise."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no experiment named {name!r} at {public_uri(mlflow.get_tracking_uri())}; "
                            f"existing experiments: {', '.join(names) or '(none)'}")
    return exp


# ---------------------------------------------------------------------------- sweeps

def experiment_of_run(run_id: str) -> str:
    """The experiment name of an existing run (a sweep under `mlflow run` puts its cells
    where mlflow put the sweep's own run)."""
    client = mlflow.MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def finished_configs(experiment: str) -> dict[str, str]:
    """{config_hash (pretrain_hash for a pre-training): run_id} of the FINISHED runs in
    `experiment` (none if it does not exist)."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    found, token = {}, None
    while True:
        page = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                  page_token=token)
        for run in page:
            key = run.data.tags.get("config_hash") or run.data.tags.get("pretrain_hash")
            if key:
                found.setdefault(key, run.info.run_id)
        token = page.token
        if not token:
            return found


def end_if_running(run_id: str, status: str, error: str) -> bool:
    """Close a run its own process could not close (killed by SIGKILL or the OOM killer):
    set `error` and end it with `status`. Returns whether it was still RUNNING."""
    client = mlflow.MlflowClient()
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, "error", error[:4000])
    client.set_terminated(run_id, status)
    return True


def close_stale_sweeps(experiment: str, sweep: str, host: str, alive) -> list[str]:
    """End as KILLED the RUNNING parent runs of `sweep` started on `host` by a process
    that no longer exists (`alive(pid)` is False), e.g. a sweep killed with SIGKILL, and
    their children left RUNNING. Returns the ids of the runs closed."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    closed = []
    stale = client.search_runs([exp.experiment_id], f"attributes.status = 'RUNNING' and tags.sweep = '{sweep}' "
                               f"and tags.sweep_host = '{host}'", max_results=1000)
    for parent in stale:
        pid = parent.data.tags.get("sweep_pid", "")
        if not pid.isdigit() or alive(int(pid)):
            continue
        orphans = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and "
                                     f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
        for run in [*orphans, parent]:
            client.set_tag(run.info.run_id, "error", f"the sweep process (pid {pid} on {host}) died without "
                                                     f"closing this run")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def tracking_is_remote() -> bool:
    """Whether the tracking URI is a server other machines could reach."""
    return mlflow.get_tracking_uri().startswith(("http://", "https://", "databricks"))


def die_with_parent() -> None:
    """In a child process (Popen preexec_fn): have Linux send it SIGTERM when the thread
    that started it dies, so a SIGKILLed sweep leaves no server or cell behind. A no-op
    where prctl is not available."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifact_args: list[str], env: dict | None = None):
    """Run a real `mlflow server` on a free loopback port, yield its URL once it answers
    /health, and stop it when the block ends. Its log is kept (and named in the error)
    only when it fails to start."""
    import shutil
    import sys
    import time
    import urllib.request

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    log = tempfile.NamedTemporaryFile("w+", prefix="mlflow-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", backend_store_uri, *artifact_args],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent, env={**os.environ, **(env or {})})
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
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
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
    # Tracking only: the server's background job runner would take CPU from the cells.
    with mlflow_server(uri, ["--default-artifact-root", os.path.abspath("mlruns"), "--no-serve-artifacts"],
                       env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}) as url:
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
