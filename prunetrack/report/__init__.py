"""The study's report, read back from the MLflow tracking server.

`build_report` queries an experiment's runs through the MLflow API only (search_runs,
metric histories, artifacts through the tracking URI), so the same code reads the
embedded SQLite store or a remote `mlflow server`. It writes
`<output_dir>/<name>/REPORT.md` with its PNG figures and logs the same files to a
report run (tag `prunetrack.kind=report`) that later queries skip.

Only FINISHED prune runs count. A cell (model, pruner, compression) with several runs
shows mean ± std (n); a cell without runs shows "—" and is listed with the
`mlflow run` command that would fill it; a cell whose runs lack the measurement shows
"—*". At 1x, where nothing is pruned, the pruners that start from a fresh
initialization share one dense run, marked "†".

One module per step, each reading only the records the one before produced:
`collect` (MLflow to records), `tables`, `figures`, `findings`, and `render` (the
markdown, the files and the report run); `records` holds the record types, `budget` the
section on runs trained for more epochs than the tables' (kept out of the tables), and
`paper` the comparison with the SynFlow paper.
"""
from prunetrack.report.collect import assemble
from prunetrack.report.paper import synflow_paper_section
from prunetrack.report.records import Pretrain, ReportError, ReportOptions, Run, Stat, Study
from prunetrack.report.render import build_report

__all__ = ["ReportError", "ReportOptions", "build_report", "assemble", "Run", "Pretrain", "Study", "Stat",
           "synflow_paper_section"]
