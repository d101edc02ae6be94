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
(the original run id), and runs already in the experiment (imported before, or made
there) are skipped.
Parent/child links (a sweep and its cells) are kept, pointing at the new run ids.
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import tempfile
import zlib
from dataclasses import dataclass
from typing import Callable

import mlflow
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from prunetrack import store, tracking

FORMAT = "prunetrack-runs-v1"
ARTIFACTS = ("config.yaml", "layers.json", "histograms.json", "score_summary.json")
IMPORTED_FROM = tracking.IMPORTED_FROM
PARENT = "mlflow.parentRunId"
# Logged-model records point into the original store; they are not carried over.
DROPPED_TAGS = {"mlflow.log-model.history"}
STATUSES = ("FINISHED", "FAILED", "KILLED")
# What every run record holds, and the JSON types each value may have.
RECORD = {"run_id": (str,), "run_name": (str, type(None)), "status": (str,), "start_time": (int,),
          "end_time": (int, type(None)), "params": (dict,), "tags": (dict,), "metrics": (dict,),
          "artifacts": (dict,)}


class ArchiveError(RuntimeError):
    """A file that is not an export, or an experiment that does not exist."""


def _open(path: str, mode: str, gz: bool | None = None):
    if path.endswith(".gz") if gz is None else gz:
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


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
        store.check_tracking(mlflow.get_tracking_uri())
        exp = store.find_experiment(experiment)
    except store.TrackingError as e:
        raise ArchiveError(str(e)) from None
    client = MlflowClient()
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list",
                              order_by=["attributes.start_time ASC"])
    kept = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) != "report" and r.info.status != "RUNNING"]
    running = sum(r.info.status == "RUNNING" for r in runs)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # Written beside `path` and renamed onto it once complete: a failed export leaves any
    # earlier file as it was, never a half-written one.
    part = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.part")
    try:
        _write_export(client, experiment, kept, part, path.endswith(".gz"), echo)
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    return ExportSummary(path, len(kept), running, os.path.getsize(path))


def _write_export(client: MlflowClient, experiment: str, kept: list, path: str, gz: bool,
                  echo: Callable[[str], None]) -> None:
    with _open(path, "w", gz) as fh:
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


def read_export(path: str) -> tuple[dict, list[dict]]:
    """The header and the run records of an export file, all checked first: ArchiveError
    naming the line and what is wrong, so that an import writes nothing from a broken file."""
    try:
        with _open(path, "r") as fh:
            lines = fh.readlines()
    except (EOFError, zlib.error, OSError) as e:  # gzip's own errors; BadGzipFile is an OSError
        what = "truncated or corrupt gzip file" if path.endswith(".gz") else "file that cannot be read"
        raise ArchiveError(f"{path} is a {what} ({type(e).__name__}: {e}); export it again") from None
    except UnicodeDecodeError as e:
        raise ArchiveError(f"{path} is not a prunetrack export ({e})") from None
    try:
        header = json.loads(lines[0]) if lines and lines[0].strip() else {}
    except json.JSONDecodeError as e:
        raise ArchiveError(f"{path} is not a prunetrack export ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArchiveError(f"{path} is not a prunetrack export (its first line has no \"format\": \"{FORMAT}\"); "
                           "write one with `prunetrack export`")
    if not isinstance(header.get("experiment"), str) or not isinstance(header.get("runs"), int):
        raise ArchiveError(f"{path}, line 1: the header lacks the experiment name or the run count")
    records = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArchiveError(f"{path}, line {n}: not a JSON run record ({e}); the file is damaged") from None
        problem = _record_problem(record)
        if problem:
            raise ArchiveError(f"{path}, line {n}: {problem}; the file is damaged: export it again")
        records.append(record)
    if len(records) != header["runs"]:
        raise ArchiveError(f"{path}: the header announces {header['runs']} runs but the file holds {len(records)}; "
                           "it was cut short or edited: export it again")
    return header, records


def _record_problem(record) -> str | None:
    """What is wrong with one run record, or None."""
    if not isinstance(record, dict):
        return f"a run record is a JSON object, got {type(record).__name__}"
    missing = [key for key in RECORD if key not in record]
    if missing:
        return f"the run record has no {', '.join(missing)}"
    for key, kinds in RECORD.items():
        if not isinstance(record[key], kinds):
            return f"{key} is {record[key]!r:.80}, not {' or '.join('null' if k is type(None) else k.__name__ for k in kinds)}"
    if record["status"] not in STATUSES:
        return f"status {record['status']!r} is not one of {', '.join(STATUSES)}"
    for key, history in record["metrics"].items():
        if not isinstance(history, list) or not all(isinstance(m, list) and len(m) == 3 for m in history):
            return f"metric {key!r} is not a list of [step, timestamp, value]"
    if not all(isinstance(text, str) for text in record["artifacts"].values()):
        return "artifacts must map file names to their text"
    return None


@dataclass
class ImportSummary:
    experiment: str
    imported: int
    skipped: int      # here already (imported before, or made here)
    deleted: int = 0  # of those, deleted here: left deleted


def import_runs(path: str, experiment: str | None = None,
                echo: Callable[[str], None] = lambda line: None) -> ImportSummary:
    """Recreate the runs of an export in the current tracking store, in `experiment`
    (default: the experiment they were exported from). The whole file is checked before
    anything is written."""
    header, records = read_export(path)
    name = experiment or header["experiment"]
    try:
        store.check_tracking(mlflow.get_tracking_uri())
    except store.TrackingError as e:
        raise ArchiveError(str(e)) from None
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise ArchiveError(f"experiment {name!r} is deleted: restore it (`mlflow experiments restore "
                           f"--experiment-id {exp.experiment_id}`) or import with --experiment OTHER_NAME")
    exp_id = exp.experiment_id if exp is not None else store.experiment_id(name)
    # Deleted runs too: a run deleted here (superseded, say) stays deleted when the export it
    # came from, or one made before the deletion, is imported again.
    here = mlflow.search_runs(experiment_ids=[exp_id], output_format="list", run_view_type=ViewType.ALL)
    # A run is already here when it was imported before, or when this store is the one it
    # was made in (a study exports its own store and imports the committed file back).
    done = {r.data.tags[IMPORTED_FROM]: r.info.run_id for r in here if r.data.tags.get(IMPORTED_FROM)}
    done.update({r.info.run_id: r.info.run_id for r in here})
    deleted_here = {r.info.run_id for r in here if r.info.lifecycle_stage == "deleted"}
    new_ids = dict(done)
    imported = skipped = deleted = 0
    for record in records:
        old = record["run_id"]
        # The original run: an export of imported runs keeps pointing at it.
        origin = record["tags"].get(IMPORTED_FROM, old)
        if old in done or origin in done:
            new_ids[old] = done.get(old) or done[origin]
            skipped += 1
            deleted += new_ids[old] in deleted_here
            continue
        tags = dict(record["tags"])
        if tags.get(PARENT):  # exports are in start order: a parent is always created first
            if tags[PARENT] in new_ids:
                tags[PARENT] = new_ids[tags[PARENT]]
            else:  # its parent was not exported (still RUNNING): no link to a run that is not here
                del tags[PARENT]
        tags[IMPORTED_FROM] = origin
        new = tracking.import_run(exp_id, record, tags)
        new_ids[old] = new
        imported += 1
        echo(f"{record['run_name']}: {old[:8]} -> {new[:8]} ({record['status']})")
    return ImportSummary(name, imported, skipped, deleted)
