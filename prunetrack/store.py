"""The tracking store itself: is it there, is it ready, which experiment. Every job
calls prepare_store before it touches the store; a problem the user can fix is a
TrackingError with one clear line."""
from __future__ import annotations

import contextlib
import os
import urllib.parse

import mlflow


class TrackingError(RuntimeError):
    """A tracking problem the user can fix: a server that does not answer, a wrong experiment."""


def public_uri(uri: str) -> str:
    """The tracking URI without any user:password."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


@contextlib.contextmanager
def environ(**values: str | None):
    """Environment variables set (None: removed) while the block runs."""
    old = {k: os.environ.get(k) for k in values}
    _set_environ(values)
    try:
        yield
    finally:
        _set_environ(old)


def _set_environ(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def check_tracking(uri: str, timeout: int = 5) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer; MLflow's own
    defaults retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    with environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout)):
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


def tracking_is_remote() -> bool:
    """Whether the tracking URI is a server other machines could reach."""
    return mlflow.get_tracking_uri().startswith(("http://", "https://", "databricks"))
