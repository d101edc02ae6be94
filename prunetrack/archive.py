"""A compact, portable copy of an experiment's runs, and its import into any tracking store.

An export keeps what the report reads: every run's params, tags, status, times, the
full history of each metric, and its small text artifacts (the resolved config, the
per-layer table, the histogram numbers, the score summary). Masks and images are left
out: the report redraws its figures from the numbers. One JSON object per line, a
header first; a `.gz` name is gzip-compressed. A study of about 35 runs is well under
a megabyte, small enough to commit beside its report.

    prunetrack export --experiment study -o reports/cifar10/runs.jsonl.gz
    prunetrack import reports/cifar10/runs.jsonl.gz      # into MLFLOW_TRACKING_URI or ./mlflow.db
    prunetrack report --experiment study --name cifar10

Importing is idempotent: each imported run carries the tag `prunetrack.imported_from`
(the original run id), and runs already imported into the experiment are skipped.
Parent/child links (a sweep and its cells) are kept, pointing at the new run ids.
"""
from __future__ import annotations

import datetime
import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from prunetrack import tracking

FORMAT = "prunetrack-runs-v1"
ARTIFACTS = ("config.yaml", "layers.json", "histograms.json", "score_summary.json")
IMPORTED_FROM = "prunetrack.imported_from"
PARENT = "mlflow.parentRunId"
# Logged-model records point into the original store; they are not carried over.
DROPPED_TAGS = {"mlflow.log-model.history"}
BATCH = 100  # log_batch takes at most 100 params or tags, 1000 metrics, per call


class ArchiveError(RuntimeError):
    """A file that is not an export, or an experiment that does not exist."""


def _open(path: str, mode: str):
    return gzip.open(path, mode + "t", encoding="utf-8") if path.endswith(".gz") else open(path, mode,
                                                                                           encoding="utf-8")


@dataclass
class ExportSummary:
    path: str
    runs: int
    skipped_running: int
    bytes: int


def _artifact_texts(client: MlflowClient, run_id: str, present: set[str]) -> dict[str, str]:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ARTIFACTS:
            if name in present:
                with open(client.download_artifacts(run_id, name, d), encoding="utf-8") as fh:
                    out[name] = fh.read()
    return out


def export_runs(experiment: str, path: str, echo: Callable[[str], None] = lambda line: None) -> ExportSummary:
    """Write every run of `experiment` except report runs and runs still RUNNING."""
    try:
        tracking.check_tracking(mlflow.get_tracking_uri())
        exp = tracking.find_experiment(experiment)
    except tracking.TrackingError as e:
        raise ArchiveError(str(e)) from None
    client = MlflowClient()
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list",
                              order_by=["attributes.start_time ASC"])
    kept = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) != "report" and r.info.status != "RUNNING"]
    running = sum(r.info.status == "RUNNING" for r in runs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _open(path, "w") as fh:
        header = {"format": FORMAT, "experiment": experiment, "runs": len(kept),
                  "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "mlflow_version": mlflow.__version__}
        fh.write(json.dumps(header) + "\n")
        for i, r in enumerate(kept, 1):
            run_id = r.info.run_id
            present = {f.path for f in client.list_artifacts(run_id)}
            record = {
                "run_id": run_id, "run_name": r.info.run_name, "status": r.info.status,
                "start_time": r.info.start_time, "end_time": r.info.end_time,
                "params": dict(r.data.params),
                "tags": {k: v for k, v in r.data.tags.items() if k not in DROPPED_TAGS},
                "metrics": {key: [[m.step, m.timestamp, m.value] for m in client.get_metric_history(run_id, key)]
                            for key in sorted(r.data.metrics)},
                "artifacts": _artifact_texts(client, run_id, present),
            }
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            echo(f"[{i}/{len(kept)}] {r.info.run_name} ({run_id[:8]}, {r.info.status})")
    return ExportSummary(path, len(kept), running, os.path.getsize(path))


def read_export(path: str) -> tuple[dict, Iterator[dict]]:
    """The header and an iterator over the run records of an export file."""
    fh = _open(path, "r")
    try:
        first = fh.readline()
        header = json.loads(first) if first.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        fh.close()
        raise ArchiveError(f"{path} is not a prunetrack export ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        fh.close()
        raise ArchiveError(f"{path} is not a prunetrack export (its first line has no \"format\": \"{FORMAT}\"); "
                           "write one with `prunetrack export`")

    def records():
        with fh:
            for n, line in enumerate(fh, 2):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ArchiveError(f"{path}, line {n}: not a JSON run record ({e})") from None

    return header, records()


@dataclass
class ImportSummary:
    experiment: str
    imported: int
    skipped: int


def import_runs(path: str, experiment: str | None = None,
                echo: Callable[[str], None] = lambda line: None) -> ImportSummary:
    """Recreate the runs of an export in the current tracking store, in `experiment`
    (default: the experiment they were exported from)."""
    header, records = read_export(path)
    name = experiment or header["experiment"]
    try:
        tracking.check_tracking(mlflow.get_tracking_uri())
    except tracking.TrackingError as e:
        raise ArchiveError(str(e)) from None
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise ArchiveError(f"experiment {name!r} is deleted: restore it (`mlflow experiments restore "
                           f"--experiment-id {exp.experiment_id}`) or import with --experiment OTHER_NAME")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
    done = {r.data.tags[IMPORTED_FROM]: r.info.run_id
            for r in mlflow.search_runs(experiment_ids=[exp_id], output_format="list",
                                        filter_string=f"tags.`{IMPORTED_FROM}` != ''")}
    new_ids = dict(done)
    imported = skipped = 0
    for record in records:
        old = record["run_id"]
        if old in done:
            skipped += 1
            continue
        tags = dict(record["tags"])
        if tags.get(PARENT):  # exports are in start order: a parent is always created first
            if tags[PARENT] in new_ids:
                tags[PARENT] = new_ids[tags[PARENT]]
            else:  # its parent was not exported (still RUNNING): no link to a run that is not here
                del tags[PARENT]
        tags[IMPORTED_FROM] = old
        run = client.create_run(exp_id, start_time=record["start_time"], run_name=record["run_name"])
        new = run.info.run_id
        new_ids[old] = new
        try:
            _log_record(client, new, record, tags)
        except BaseException:
            client.set_terminated(new, "FAILED")  # never leave a half-imported run RUNNING
            raise
        client.set_terminated(new, record["status"], end_time=record["end_time"])
        imported += 1
        echo(f"{record['run_name']}: {old[:8]} -> {new[:8]} ({record['status']})")
    return ImportSummary(name, imported, skipped)


def _log_record(client: MlflowClient, run_id: str, record: dict, tags: dict[str, str]) -> None:
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
