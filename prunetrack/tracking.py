"""Everything prunetrack writes to MLflow, in one place.

A job opens its run with `job_run` (which also picks up the run that `mlflow run`
created, through MLFLOW_RUN_ID) and logs through the helpers below. The run ends
FINISHED, or FAILED with the error as a tag and the traceback as `error.txt`
(KILLED on Ctrl-C or SIGTERM), never left RUNNING.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import traceback
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


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so the run is closed as KILLED."""


def _raise_terminated(signum, frame):
    raise _Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def job_run(experiment: str, run_name: str):
    """The MLflow run of one job. Under `mlflow run` the run already exists (its id is in
    MLFLOW_RUN_ID) and its experiment and name are mlflow's; otherwise we create it."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=None if os.environ.get("MLFLOW_RUN_ID") else run_name)
    previous = None
    with contextlib.suppress(ValueError):  # not in the main thread
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield run
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, _Terminated)) else "FAILED"
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
