"""Everything prunetrack writes to MLflow, in one place, and the look-ups it needs.

A job opens its run with `job_run` (which also picks up the run that `mlflow run`
created, through MLFLOW_RUN_ID) and logs through the helpers below. The run ends
FINISHED, or FAILED with the error as a tag and the traceback as `error.txt`
(KILLED on Ctrl-C, SIGTERM, or when the sweep or `mlflow run` that started it dies:
prunetrack.interrupts), never left RUNNING.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
import traceback
from typing import Any

import mlflow
import torch
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from prunetrack import interrupts, masking, store


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


# Tags a parent process (a sweep) asks every run it starts to carry, as a JSON object
# (e.g. {"mlflow.parentRunId": ..., "sweep": ..., "cell": ...}).
RUN_TAGS_ENV = "PRUNETRACK_RUN_TAGS"
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # the run tag that lists its tables for the UI


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
def job_run(experiment: str, run_name: str, tags: dict[str, Any] | None = None, resume_run_id: str | None = None,
            system_metrics: bool = False):
    """The MLflow run of one job (or sweep). Under `mlflow run` the run already exists (its
    id is in MLFLOW_RUN_ID) and its experiment and name are mlflow's; with `resume_run_id`
    that run is reopened (status back to RUNNING); otherwise we create one. `tags` and
    those in PRUNETRACK_RUN_TAGS are set as the run starts, so that even a run that fails
    at once is attributed to its sweep. With `system_metrics`, MLflow samples CPU, memory
    (and GPU) use into `system/*` metrics while the run is open, unless the user turned
    that off (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false)."""
    tags = {**env_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    sample = system_metrics and os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").lower() in ("true", "1")
    # Entered before the run exists, so a SIGTERM that arrives while it is being
    # created still closes it (as KILLED) instead of leaving it RUNNING.
    with interrupts.stoppable():
        try:
            if os.environ.get("MLFLOW_RUN_ID"):
                run = mlflow.start_run(tags=tags or None, log_system_metrics=sample)
                if _generated_name(run.info.run_name):  # `mlflow run` without --run-name: name it as we would
                    mlflow.MlflowClient().update_run(run.info.run_id, name=run_name)
            elif resume_run_id:
                _clear_interruption(resume_run_id)
                run = mlflow.start_run(run_id=resume_run_id, tags=tags or None, log_system_metrics=sample)
            else:
                run = mlflow.start_run(experiment_id=store.experiment_id(experiment), run_name=run_name, tags=tags or None,
                                       log_system_metrics=sample)
            yield run
        except BaseException as e:
            with interrupts.closing():
                _close(e)
            raise
        else:
            with interrupts.closing():
                mlflow.end_run("FINISHED")


# Set on every run closed by an interruption (SIGINT, SIGTERM, parent-died). `mlflow run`
# ends its run FAILED after an interruption whatever the entry point wrote (MLflow 3.17
# compares the string status with integer codes, so it never sees that the run has ended);
# the tag is how a reader still tells an interrupted run from a failed one (`outcome`).
INTERRUPTED_TAG = "interrupted"


def outcome(run) -> str:
    """A run's status, with a run that `mlflow run` turned FAILED after an interruption
    counted as KILLED."""
    if run.info.status == "FAILED" and run.data.tags.get(INTERRUPTED_TAG):
        return "KILLED"
    return run.info.status


def _close(e: BaseException) -> None:
    """End the active run after `e`: KILLED for an interruption, FAILED otherwise."""
    error = f"{type(e).__name__}: {e}"
    cause = interrupts.cause(e) if isinstance(e, KeyboardInterrupt) else None  # Ctrl-C, SIGTERM, parent died
    if cause is None and interrupts.parent_died():
        # A print to the dead parent's pipe (BrokenPipeError) can fail before the watcher
        # notices: the same event, closed the same way (error.txt has the trace).
        error, cause = f"{interrupts.ParentDied.__name__}: {interrupts.parent_died_message()}", "parent-died"
    if mlflow.active_run():
        with contextlib.suppress(Exception):  # a dead tracking server must not hide the real error
            mlflow.set_tags({"error": error[:4000], **({INTERRUPTED_TAG: cause} if cause else {})})
            mlflow.log_text(traceback.format_exc(), "error.txt")
        mlflow.end_run("KILLED" if cause else "FAILED")


def _clear_interruption(run_id: str) -> None:
    """A reopened run is no longer failed or killed: its `error` and `interrupted` tags move to
    `interruptions` (how many pieces ended early) and `last_interruption` (the latest cause),
    so that a run that goes on to finish does not carry an error in the UI."""
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    if "error" not in tags:
        return
    cause = tags.get(INTERRUPTED_TAG)
    client.set_tag(run_id, "interruptions", str(int(tags.get("interruptions", "0")) + 1))
    client.set_tag(run_id, "last_interruption", (f"{cause}: " if cause else "") + tags["error"][:3900])
    for key in ("error", INTERRUPTED_TAG):
        if key in tags:
            client.delete_tag(run_id, key)


def _generated_name(name: str | None) -> bool:
    """Whether `name` is one MLflow made up (adjective-noun-number, from its word lists)."""
    m = re.fullmatch(r"([a-z]+)-([a-z]+)-(\d+)", name or "")
    if not m:
        return False
    try:
        from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES
    except ImportError:  # the lists moved: the pattern alone decides
        return True
    return m.group(1) in _GENERATOR_PREDICATES and m.group(2) in _GENERATOR_NOUNS


def logged_steps(run_id: str, key: str) -> set[int]:
    """The steps at which `key` was logged in a run (to resume without duplicates)."""
    return {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


def find_pretrain(experiment: str, pretrain_hash: str) -> str | None:
    """The id of the first FINISHED pre-training run with this hash in `experiment` whose
    weights are in this store, if any. A pre-training imported from an export finished
    elsewhere, but its weights did not travel (exports carry no weights): it does not count."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"attributes.status = 'FINISHED' and "
                              f"tags.pretrain_hash = '{pretrain_hash}'", max_results=100,
                              order_by=["attributes.start_time ASC"])
    return next((r.info.run_id for r in runs if has_weights(r.info.run_id)), None)


def has_weights(run_id: str, name: str = "weights.pt") -> bool:
    """Whether the run logged weights (`log_weights`) that this store holds."""
    return any(f.path == name for f in mlflow.MlflowClient().list_artifacts(run_id))


def log_weights(state: dict[str, torch.Tensor], name: str = "weights.pt") -> None:
    """A model's weights (a state dict, on the CPU) as an artifact."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
        mlflow.log_artifact(path)


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order.
    Two pre-trainings with one digest hold the same weights to the bit, so the runs that
    prune either compare like for like (the report reads it: tag `weights_sha256`)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
            raise store.TrackingError(f"cannot load weights from {source!r} ({type(e).__name__}: {str(e)[:300]}); "
                             f"init_from takes a run id, runs:/<run_id> of a run that logged weights.pt, or "
                             f"a path to such a file") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise store.TrackingError(f"{source!r} does not hold a state dict of weights")
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


DESCRIPTION_TAG = MLFLOW_RUN_NOTE  # "mlflow.note.content": the run's Description at the top of its page in the UI


def describe(text: str) -> None:
    """Set the active run's description (markdown): what the run is and what it found, in a
    sentence, for whoever browses the runs."""
    mlflow.set_tag(DESCRIPTION_TAG, text)


def log_masks(masks: dict[str, torch.Tensor]) -> None:
    """Log the masks as `masks.pt` (one bit per weight); `prunetrack.load_masks`
    reads them back from `runs:/<run_id>`."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "masks.pt")
        masking.save_masks(masks, path)
        mlflow.log_artifact(path)


def log_table(rows: list[dict[str, Any]], name: str) -> None:
    """A table the MLflow UI shows as one (artifact `<name>.json`): what `mlflow.log_table`
    writes (pandas' "split" layout, and the run tag that lists the file as a table), made
    here without pandas, which nothing else in a job needs (mlflow-skinny, as on a GPU machine
    set up from wheels, leaves it out)."""
    columns = list(rows[0]) if rows else []
    file = f"{name}.json"
    mlflow.log_dict({"columns": columns, "data": [[r[c] for c in columns] for r in rows]}, file)
    run_id = mlflow.active_run().info.run_id
    listed = json.loads(mlflow.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
    if {"path": file, "type": "table"} not in listed:
        mlflow.set_tag(LOGGED_ARTIFACTS, json.dumps(listed + [{"path": file, "type": "table"}]))


def log_dict(obj: dict, name: str) -> None:
    mlflow.log_dict(obj, name)


def log_figure(figure, name: str) -> None:
    """A matplotlib figure as an image artifact (`name`, e.g. `weight_histograms.png`)."""
    mlflow.log_figure(figure, name)


def log_folder(folder: str) -> None:
    """Every file under `folder` as artifacts of the active run."""
    mlflow.log_artifacts(folder)


def log_text(text: str, name: str) -> None:
    mlflow.log_text(text, name)


# ---------------------------------------------------------------------------- runs that have ended

BATCH = 100  # log_batch takes at most 100 params or tags, 1000 metrics, per call


def log_to_finished_run(run_id: str, metrics: dict[str, float], tags: dict[str, Any]) -> None:
    """Metrics (step 0) and tags added to a run that has ended, e.g. by the timing pass,
    without reopening it: its status and end time stay as they are."""
    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                                    tags=[RunTag(k, str(v)) for k, v in tags.items()])


def import_run(experiment_id: str, record: dict, tags: dict[str, str]) -> str:
    """Recreate an exported run (`prunetrack import`): its name, start time, params, `tags`,
    metric histories, text artifacts, then its status and end time. Returns the new id; a
    run whose copy fails half-way is closed FAILED, never left RUNNING."""
    client = mlflow.MlflowClient()
    run_id = client.create_run(experiment_id, start_time=record["start_time"], run_name=record["run_name"]).info.run_id
    try:
        params = [Param(k, str(v)) for k, v in record["params"].items()]
        tag_list = [RunTag(k, str(v)) for k, v in tags.items()]
        metrics = [Metric(key, value, timestamp, step)
                   for key, history in record["metrics"].items() for step, timestamp, value in history]
        for i in range(0, len(params), BATCH):
            client.log_batch(run_id, params=params[i:i + BATCH])
        for i in range(0, len(tag_list), BATCH):
            client.log_batch(run_id, tags=tag_list[i:i + BATCH])
        for i in range(0, len(metrics), 10 * BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + 10 * BATCH])
        if record["artifacts"]:
            with tempfile.TemporaryDirectory() as d:
                for name, text in record["artifacts"].items():
                    with open(os.path.join(d, os.path.basename(name)), "w", encoding="utf-8") as fh:
                        fh.write(text)
                client.log_artifacts(run_id, d)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, record["status"], end_time=record["end_time"])
    return run_id


# ---------------------------------------------------------------------------- reading back

# Runs that are not prune jobs carry this tag (the report's own run: "report"), so that
# whatever reads prune runs back (the report, export) can skip them.
KIND_TAG = "prunetrack.kind"
# An imported run carries the id of the run it copies (`prunetrack import`).
IMPORTED_FROM = "prunetrack.imported_from"


# ---------------------------------------------------------------------------- sweeps

def _runs(experiment: str, finished_only: bool = True):
    """Every FINISHED run of `experiment` (every run, without `finished_only`), page by page
    (none if it does not exist)."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'" if finished_only else "",
                                  max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def speed_records(experiment: str) -> list[dict]:
    """What the prune and pre-training runs of `experiment` measured of their own speed, for
    a sweep's estimate: each run's status, tags, params and metrics, `epoch_times`, the
    seconds of each training epoch, and `eval_times`, of each epoch's evaluation (runs made
    before it was logged have none). Runs of any status: the epochs of a run stopped or still
    running timed the machine as well as a finished one's."""
    client, out = mlflow.MlflowClient(), []
    for run in _runs(experiment, finished_only=False):
        if run.data.tags.get(KIND_TAG, "prune") not in ("prune", "pretrain"):
            continue
        times = [m.value for m in client.get_metric_history(run.info.run_id, "epoch_time")]
        if times:
            out.append({"status": run.info.status, "tags": run.data.tags, "params": run.data.params,
                        "metrics": run.data.metrics, "epoch_times": times,
                        "eval_times": [m.value for m in client.get_metric_history(run.info.run_id, "eval_time")]})
    return out


def tag_values(run_ids, key: str) -> dict[str, str]:
    """{run_id: the value of its tag `key`} of those of `run_ids` that have it."""
    client = mlflow.MlflowClient()
    tags = {run_id: client.get_run(run_id).data.tags.get(key) for run_id in run_ids}
    return {run_id: value for run_id, value in tags.items() if value is not None}


def experiment_of_run(run_id: str) -> str:
    """The experiment name of an existing run (a sweep under `mlflow run` puts its cells
    where mlflow put the sweep's own run)."""
    client = mlflow.MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def finished_configs(experiment: str) -> dict[str, str]:
    """{config_hash (pretrain_hash for a pre-training): run_id} of the FINISHED runs in
    `experiment` (none if it does not exist); pre-trainings count only with their weights."""
    found = {}
    for run in _runs(experiment):
        key = run.data.tags.get("config_hash") or run.data.tags.get("pretrain_hash")
        if run.data.tags.get("pretrain_hash") and not has_weights(run.info.run_id):
            continue  # imported: finished elsewhere, its weights are not here to start from
        if key:
            found.setdefault(key, run.info.run_id)
    return found


def find_cell_run(experiment: str, sweep: str, parent_run_id: str, hash_tag: str, value: str) -> str | None:
    """The run a sweep's cell logged to, found by its tags once its process has ended:
    `hash_tag` (config_hash, or pretrain_hash for a pre-training) = `value`, and `sweep`.
    A cell that resumes a run of an earlier sweep re-tags it with this sweep's parent as it
    reopens it, so the most recent run with `parent_run_id` is the one; failing that (killed
    while reopening it), the most recent one left RUNNING. None when the cell made no run."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    # The sweep name is compared here, not in the filter, where a quote in it would break the query.
    runs = [r for r in client.search_runs([exp.experiment_id], f"tags.{hash_tag} = '{value}'", max_results=1000,
                                          order_by=["attributes.start_time DESC"])
            if r.data.tags.get("sweep") == sweep]
    ours = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
    ours = ours or [r for r in runs if r.info.status == "RUNNING"]
    return ours[0].info.run_id if ours else None


def running_children(experiment: str, parent_run_id: str) -> list[str]:
    """The runs of `experiment` still RUNNING whose parent is `parent_run_id` (a sweep's cells)."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                              "attributes.status = 'RUNNING'", max_results=1000)
    return [r.info.run_id for r in runs]


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
