"""Step 1: query MLflow once and turn the experiment into plain records.

`collect` reads the runs (search_runs), the metric histories and artifacts the later
steps need (through the tracking URI, so a remote `mlflow server` works as the embedded
store does), and returns a `Study` with its cells, the dense cell shared at 1x, the
pre-training runs and the list of missing cells, all computed here. `assemble` does the
same from runs already in hand.
"""
from __future__ import annotations

import dataclasses
import statistics
from collections import Counter, defaultdict

import mlflow
from mlflow.tracking import MlflowClient

from prunetrack import store
from prunetrack.report.records import (
    ABLATIONS,
    ACCURACY,
    CURVE_KEYS,
    FLOPS,
    STUDY_COMPRESSIONS,
    STUDY_MODELS,
    STUDY_PRUNERS,
    TEST_TIME,
    TIMED_TEST_TIME,
    UNSHARED_AT_1X,
    VGG16_VARIANTS,
    Pretrain,
    ReportError,
    ReportOptions,
    Run,
    Study,
    plural,
)
from prunetrack.store import public_uri
from prunetrack.tracking import IMPORTED_FROM, KIND_TAG, outcome


def load_runs(experiment_id: str) -> tuple[list[Run], Counter, dict[str, Pretrain]]:
    """The experiment's FINISHED prune runs (report runs skipped), a count of the statuses
    of the prune runs that are not FINISHED, and the FINISHED pre-training runs by id."""
    found = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list")
    runs, other, pretrains = [], Counter(), {}
    for r in found:
        tags = r.data.tags
        if tags.get(KIND_TAG) == "pretrain":
            if r.info.status == "FINISHED":
                pre = Pretrain(r.info.run_id, r.info.run_name or r.info.run_id[:8],
                               dict(r.data.params), dict(tags), dict(r.data.metrics))
                pretrains[r.info.run_id] = pre
                if tags.get(IMPORTED_FROM):  # the runs that start from it name its original id
                    pretrains.setdefault(tags[IMPORTED_FROM], pre)
            continue
        if tags.get(KIND_TAG) == "report" or not {"model", "pruner", "compression"} <= set(tags):
            continue
        if r.info.status != "FINISHED":
            other[outcome(r)] += 1
            continue
        runs.append(Run(r.info.run_id, r.info.run_name or r.info.run_id[:8], tags["model"], tags["pruner"],
                        float(tags["compression"]), tags.get("seed", r.data.params.get("seed", "?")),
                        dict(r.data.params), dict(tags), dict(r.data.metrics)))
    return runs, other, pretrains


def group(opts: ReportOptions, runs: list[Run], experiment_id: str = "", tracking_uri: str = "",
          skipped: Counter | None = None, pretrains: dict[str, Pretrain] | None = None) -> Study:
    """The study's cells from its runs: dataset and ablations filtered out, models, pruners
    and ratios chosen, the dense run shared at 1x, the testing-time metric and the
    pre-training runs linked from the main model."""
    skipped = skipped or Counter()
    runs = sorted(runs, key=lambda r: (r.model, r.pruner, r.compression, r.seed, r.id))
    if not runs:
        others = ", ".join(f"{n} {s}" for s, n in skipped.items())
        raise ReportError(f"experiment {opts.experiment!r} has no FINISHED prune runs"
                          + (f" ({others} ignored)" if others else "")
                          + "; run some with `mlflow run . -e prune` or `prunetrack prune` first")

    datasets = Counter(r.setting("dataset") for r in runs)
    dataset = opts.dataset or (next(iter(datasets)) if len(datasets) == 1 else "")
    if not dataset:
        counts = ", ".join(f"{d}: {plural(n, 'run')}" for d, n in datasets.items())
        raise ReportError(f"experiment {opts.experiment!r} holds runs on several datasets ({counts}); "
                          "choose one with --dataset")
    if dataset not in datasets:
        raise ReportError(f"no finished runs on dataset {dataset!r}; found: {', '.join(datasets)}")
    excluded: dict[str, list[Run]] = defaultdict(list)
    kept = []
    for r in runs:
        if r.setting("dataset") != dataset:
            excluded[f"dataset {r.setting('dataset')}"].append(r)
        elif any(r.setting(a) == "true" for a in ABLATIONS):
            # An ablation answers another question; averaging it into a cell would blur both.
            excluded["ablation (" + ", ".join(a for a in ABLATIONS if r.setting(a) == "true") + ")"].append(r)
        else:
            kept.append(r)
    # One training budget per table: runs trained for another number of epochs are the
    # training-budget section's (averaging them into a cell would mix two budgets).
    budgets = {m: _budget([r for r in kept if r.model == m]) for m in {r.model for r in kept}}
    longer = [r for r in kept if r.setting("post_epochs") not in (None, budgets[r.model])]  # None: not logged
    kept = [r for r in kept if r not in longer]
    for r in longer:
        excluded[f"another training budget ({r.setting('post_epochs')} epochs; see Training budget)"].append(r)

    found_models = sorted({r.model for r in kept})
    vgg16 = [m for m in VGG16_VARIANTS if m in found_models] or list(VGG16_VARIANTS[:1])
    models = opts.models or list(dict.fromkeys([*vgg16, *STUDY_MODELS, *found_models]))
    main = next((m for m in models if any(r.model == m for r in kept)), None)
    if main is None:
        raise ReportError(f"no finished runs of model(s) {', '.join(models)} in experiment "
                          f"{opts.experiment!r}; models found: {', '.join(found_models)}")
    pruners = opts.pruners or list(dict.fromkeys([*STUDY_PRUNERS, *sorted({r.pruner for r in kept})]))
    compressions = opts.compressions or sorted({*STUDY_COMPRESSIONS, *(r.compression for r in kept
                                                                      if r.model == main)})
    timed = any(TIMED_TEST_TIME.key in r.metrics for r in kept if r.model == main)
    time_metric = TIMED_TEST_TIME if timed else TEST_TIME
    times = [r.metrics[time_metric.key] for r in kept if r.model == main and time_metric.key in r.metrics]
    if times and statistics.median(times) >= 1:  # a CPU's whole test set: 9.15 s reads better than 9,153.0 ms
        time_metric = dataclasses.replace(time_metric, unit="s", scale=1.0, digits=2)
    study = Study(opts, experiment_id, kept, list(models), list(pruners), [float(c) for c in compressions],
                  dataset, main, tracking_uri, dict(excluded), skipped,
                  time_metric=time_metric)
    study.budget, study.longer = int(float(budgets[main] or 0)), longer
    for r in kept:
        study.cells.setdefault((r.model, r.pruner, r.compression), []).append(r)
    share_dense_cell(study)
    link_pretrains(study, pretrains or {})
    return study


def _budget(runs: list[Run]) -> str | None:
    """The `post_epochs` of most runs (the shortest among equals: the grid, not its extension)."""
    counts = Counter(e for r in runs if (e := r.setting("post_epochs")) is not None)
    return max(counts, key=lambda e: (counts[e], -float(e)), default=None)


def share_dense_cell(study: Study) -> None:
    """At 1x nothing is pruned, so a sweep runs the dense network once for every pruner that
    starts from a fresh initialization: each such pruner's empty 1x cell shows that run."""
    for model in study.models:
        dense: dict[str, Run] = {}
        for r in study.runs:
            if r.model == model and r.dense_from_scratch:
                dense.setdefault(r.tags.get("config_hash") or r.id, r)
        if not dense:
            continue
        for p in study.pruners:
            key = (model, p, 1.0)
            if p not in UNSHARED_AT_1X and not study.cells.get(key):
                study.cells[key] = list(dense.values())
                study.shared[key] = list(dense.values())


def link_pretrains(study: Study, pretrains: dict[str, Pretrain]) -> None:
    users: dict[str, list[Run]] = {}
    for r in study.runs:
        if r.model == study.main and r.pretrained:
            users.setdefault(r.tags["pretrain_run"], []).append(r)
    for run_id, rs in users.items():
        pre = pretrains.get(run_id)
        if pre is None:
            study.pretrain_missing.append(run_id)
            continue
        if pre not in study.pretrains:  # named by its id here and by its original id
            pre.users = []
            study.pretrains.append(pre)
        pre.users += rs
    # Named runs in order; of two with one name (pre-trained again), the imported one first.
    study.pretrains.sort(key=lambda p: (p.name, not p.tags.get(IMPORTED_FROM)))


def missing_cells(s: Study) -> dict[tuple, set[str]]:
    """Every cell that a table or figure shows without its value, and why: walks the same
    cells as the tables (1-6) and the weight-histogram figures."""
    out: dict[tuple, set[str]] = {}
    F = s.opts.focus

    def need(model: str, pruner: str, c: float, present, what: str) -> None:
        if present:
            return
        key = (model, pruner, c)
        out.setdefault(key, set()).add(f"{what} not logged" if s.cell(*key) else "no finished run")

    for m in s.models:
        for p in s.pruners:
            need(m, p, F, s.stat(m, p, F, ACCURACY.key), ACCURACY.key)
    for metric in (ACCURACY, s.time_metric, FLOPS):
        for c in s.compressions:
            for p in s.pruners:
                need(s.main, p, c, s.stat(s.main, p, c, metric.key), metric.key)
    density = {p: s.layer_stats(p, "density") for p in s.pruners}
    flops = {p: s.layer_stats(p, "flops_effective") for p in s.pruners}
    reference = next((d[0] for d in density.values() if d), None)
    if reference is None:
        for p in s.pruners:
            need(s.main, p, F, False, "layers.json")
    else:
        for row in reference:
            for p in s.pruners:
                need(s.main, p, F, density[p] and row["layer"] in density[p][1], "layers.json")
                need(s.main, p, F, flops[p] and row["layer"] in flops[p][1], "per-layer FLOPs")
    for p in s.pruners:
        if s.cell(s.main, p, F):
            need(s.main, p, F, s.histogram_run(p), "histograms.json")
    return out


def assemble(opts: ReportOptions, runs: list[Run], pretrains: list[Pretrain] = (), **kw) -> Study:
    """A study from records in hand (runs carrying whatever histories and artifacts they
    have): what `collect` returns, without a tracking server."""
    study = group(opts, runs, pretrains={p.id: p for p in pretrains}, **kw)
    study.missing = missing_cells(study)
    return study


def _artifact(run_id: str, path: str) -> dict | None:
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except Exception:  # absent (an older job) or unreadable: the cell is marked, not fatal
        return None


def _layers(run_id: str) -> list[dict] | None:
    """layers.json (an `mlflow.log_table` table) as one dict per layer."""
    table = _artifact(run_id, "layers.json")
    if not table or "columns" not in table:
        return None
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def _curves(client: MlflowClient, record) -> None:
    """Fill a run's (or pre-training's) per-epoch CURVE_KEYS histories, unless it has them."""
    if not record.histories:
        record.histories = {k: sorted((m.step, m.value) for m in client.get_metric_history(record.id, k))
                            for k in CURVE_KEYS}


def load_details(s: Study) -> None:
    """What the per-layer tables, the figures and the findings read beyond a run's
    params, tags and metrics, for the runs that need it: layers.json of the main model's
    runs at the focus ratio, one run's histograms.json per pruner there, their loss
    histories, and the per-epoch curves of the pre-training runs and of the dense runs that
    repeat them."""
    client = MlflowClient()
    F = s.opts.focus
    focus = {r.id: r for r in s.runs if r.model == s.main and r.compression == F}
    for p in s.pruners:
        for r in s.cell(s.main, p, F):
            focus.setdefault(r.id, r)
    for r in focus.values():
        r.layers = _layers(r.id)
    for p in s.pruners:
        runs = s.cell(s.main, p, F)
        for r in runs:
            _curves(client, r)
        for r in runs:
            if r.histograms is None:
                r.histograms = _artifact(r.id, "histograms.json")
            if r.histograms:
                break
    for pre in s.pretrains:
        for run in (pre, *s.twins(pre)):
            _curves(client, run)
    for r in s.longer:  # the training-budget section draws them beside their cells' runs
        for run in (r, *s.cell(r.model, r.pruner, r.compression)):
            _curves(client, run)


def collect(opts: ReportOptions) -> Study:
    """Query the tracking server once into the study's records."""
    uri = mlflow.get_tracking_uri()
    try:
        store.check_tracking(uri)
        exp = store.find_experiment(opts.experiment)
    except store.TrackingError as e:
        raise ReportError(str(e)) from None
    runs, skipped, pretrains = load_runs(exp.experiment_id)
    study = group(opts, runs, exp.experiment_id, public_uri(uri), skipped, pretrains)
    load_details(study)
    study.missing = missing_cells(study)
    return study
