"""The study's report, read back from the MLflow tracking server.

`build_report` queries an experiment's runs through the MLflow API only (search_runs,
metric histories, artifacts through the tracking URI), so the same code reads the
embedded SQLite store or a remote `mlflow server`. It writes
`<output_dir>/<name>/REPORT.md` with its PNG figures and logs the same files to a
report run (tag `prunetrack.kind=report`) that later queries skip.

Only FINISHED prune runs count. A cell (model, pruner, compression) with several runs
shows mean ± std (n); a cell without runs shows "—" and is listed with the
`mlflow run` command that would fill it; a cell whose runs lack the measurement shows
"—*".
"""
from __future__ import annotations

import datetime
import math
import os
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

import mlflow
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from prunetrack import config, tracking
from prunetrack.tracking import KIND_TAG, public_uri

STUDY_MODELS = ("vgg16", "resnet50")
STUDY_COMPRESSIONS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0)
STUDY_PRUNERS = ("rand", "mag", "snip", "grasp", "synflow")
PRUNER_LABELS = {"rand": "Rand", "mag": "Mag", "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow"}
NO_RUN = "—"
NOT_LOGGED = "—*"
ABLATIONS = ("shuffle", "reinit", "invert")
TAG_FIRST = {"device"}  # the param says "auto", the tag names the hardware


class ReportError(RuntimeError):
    """A problem the user can fix (wrong experiment, no runs, server down)."""


@dataclass
class ReportOptions:
    experiment: str
    name: str = ""
    output_dir: str = "reports"
    models: list[str] | None = None        # None: the study's models plus any found
    compressions: list[float] | None = None
    pruners: list[str] | None = None
    dataset: str = ""                      # "": the only dataset found (an error if several)
    focus: float = 10.0                    # the ratio of tables 1, 5, 6 and the per-layer figures


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    scale: float
    digits: int

    def fmt(self, x: float) -> str:
        return f"{x * self.scale:,.{self.digits}f}"


ACCURACY = Metric("test_accuracy", "Test accuracy (top-1)", "%", 1.0, 2)
TEST_TIME = Metric("test_time", "Testing time (whole test set)", "ms", 1e3, 1)
FLOPS = Metric("flops_effective", "FLOPs (effective, 2 x MACs)", "MFLOPs", 1e-6, 1)


# ---------------------------------------------------------------------------- runs

@dataclass
class Run:
    id: str
    name: str
    model: str
    pruner: str
    compression: float
    seed: str
    params: dict
    tags: dict
    metrics: dict

    def setting(self, key: str) -> str | None:
        """A setting as the job resolved it: `<key>_resolved` first, then the param, then the tag."""
        sources = (self.params.get(f"{key}_resolved"), self.params.get(key), self.tags.get(key))
        if key in TAG_FIRST:
            sources = (self.tags.get(key), *sources)
        for source in sources:
            if source is not None:
                return _norm(source)
        return None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id[:8]})"


def _norm(value: str) -> str:
    """One spelling per value: 0.001 and 1e-3 are the same setting, True and true too."""
    text = str(value)
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def model_label(name: str) -> str:
    m = re.fullmatch(r"(vgg|resnet)(\d+)(_bn)?", name)
    if not m:
        return name
    return ("VGG" if m[1] == "vgg" else "ResNet") + m[2] + (" (BN)" if m[3] else "")


def pruner_label(name: str) -> str:
    return PRUNER_LABELS.get(name, name)


def cell_name(model: str, pruner: str | None, compression: float) -> str:
    parts = [model_label(model)] + ([pruner_label(pruner)] if pruner else []) + [f"{compression:g}x"]
    return "[" + " · ".join(parts) + "]"


def load_runs(experiment_id: str) -> tuple[list[Run], Counter]:
    """The experiment's prune runs (report runs skipped), and a count of the statuses
    of those that are not FINISHED."""
    found = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list")
    runs, other = [], Counter()
    for r in found:
        tags = r.data.tags
        if tags.get(KIND_TAG) == "report" or not {"model", "pruner", "compression"} <= set(tags):
            continue
        if r.info.status != "FINISHED":
            other[r.info.status] += 1
            continue
        runs.append(Run(r.info.run_id, r.info.run_name or r.info.run_id[:8], tags["model"], tags["pruner"],
                        float(tags["compression"]), tags.get("seed", r.data.params.get("seed", "?")),
                        dict(r.data.params), dict(tags), dict(r.data.metrics)))
    runs.sort(key=lambda r: (r.model, r.pruner, r.compression, r.seed, r.id))
    return runs, other


class Artifacts:
    """Run artifacts read through the tracking URI, each at most once."""

    def __init__(self):
        self._cache: dict[tuple[str, str], dict | None] = {}

    def json(self, run_id: str, path: str) -> dict | None:
        key = (run_id, path)
        if key not in self._cache:
            try:
                self._cache[key] = mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
            except Exception:  # absent (an older job) or unreadable: the cell is marked, not fatal
                self._cache[key] = None
        return self._cache[key]

    def layers(self, run_id: str) -> list[dict] | None:
        """layers.json (an `mlflow.log_table` table) as one dict per layer."""
        table = self.json(run_id, "layers.json")
        if not table or "columns" not in table:
            return None
        return [dict(zip(table["columns"], row)) for row in table["data"]]


# ---------------------------------------------------------------------------- cells

@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def fmt(self, one: Callable[[float], str]) -> str:
        if self.n == 1:
            return one(self.mean)
        return f"{one(self.mean)} ± {one(self.std)} (n={self.n})"


@dataclass
class Study:
    opts: ReportOptions
    experiment: object
    runs: list[Run]
    models: list[str]
    pruners: list[str]
    compressions: list[float]
    dataset: str
    main: str                                   # the model of tables 2-6
    excluded: dict[str, list[Run]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    cells: dict = field(default_factory=dict)   # (model, pruner, compression) -> [Run]
    missing: dict = field(default_factory=dict)  # (model, pruner, compression) -> why
    artifacts: Artifacts = field(default_factory=Artifacts)
    histories: list = field(default_factory=list)  # (run, train losses, test losses) of the loss figure

    def cell(self, model: str, pruner: str, compression: float) -> list[Run]:
        return self.cells.get((model, pruner, compression), [])

    def stat(self, model: str, pruner: str, compression: float, metric: str) -> Stat | None:
        values = [r.metrics[metric] for r in self.cell(model, pruner, compression) if metric in r.metrics]
        return Stat(values) if values else None

    def mark(self, model: str, pruner: str, compression: float, what: str) -> str:
        """The visible mark of an empty cell, remembering why for the missing-cells list."""
        key = (model, pruner, compression)
        if not self.cell(*key):
            self.missing.setdefault(key, set()).add("no finished run")
            return NO_RUN
        self.missing.setdefault(key, set()).add(f"{what} not logged")
        return NOT_LOGGED

    def baseline(self, model: str, metric: str) -> tuple[Stat | None, list[Run]]:
        """The dense (1x) baseline: every 1x run of the model, whatever its pruner (at 1x
        no pruner removes a weight)."""
        runs = [r for (m, _, c), rs in self.cells.items() if m == model and c == 1.0 for r in rs]
        values = [r.metrics[metric] for r in runs if metric in r.metrics]
        return (Stat(values) if values else None), runs


def collect(opts: ReportOptions) -> Study:
    """Query the tracking server and group the runs into the study's cells."""
    try:
        tracking.check_tracking(mlflow.get_tracking_uri())
        exp = tracking.find_experiment(opts.experiment)
    except tracking.TrackingError as e:
        raise ReportError(str(e)) from None
    runs, skipped = load_runs(exp.experiment_id)
    if not runs:
        others = ", ".join(f"{n} {s}" for s, n in skipped.items())
        raise ReportError(f"experiment {opts.experiment!r} has no FINISHED prune runs"
                          + (f" ({others} ignored)" if others else "")
                          + "; run some with `mlflow run . -e prune` or `prunetrack prune` first")

    datasets = Counter(r.setting("dataset") for r in runs)
    dataset = opts.dataset or (next(iter(datasets)) if len(datasets) == 1 else "")
    if not dataset:
        raise ReportError(f"experiment {opts.experiment!r} holds runs on several datasets "
                          f"({', '.join(f'{d}: {n} runs' for d, n in datasets.items())}); choose one with --dataset")
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

    found_models = sorted({r.model for r in kept})
    models = opts.models or list(dict.fromkeys([*STUDY_MODELS, *found_models]))
    main = next((m for m in models if any(r.model == m for r in kept)), None)
    if main is None:
        raise ReportError(f"no finished runs of model(s) {', '.join(models)} in experiment "
                          f"{opts.experiment!r}; models found: {', '.join(found_models)}")
    pruners = opts.pruners or list(dict.fromkeys([*STUDY_PRUNERS, *sorted({r.pruner for r in kept})]))
    compressions = opts.compressions or sorted({*STUDY_COMPRESSIONS, *(r.compression for r in kept
                                                                      if r.model == main)})
    study = Study(opts, exp, kept, models, pruners, [float(c) for c in compressions], dataset, main,
                  dict(excluded), skipped)
    for r in kept:
        study.cells.setdefault((r.model, r.pruner, r.compression), []).append(r)
    return study


# ---------------------------------------------------------------------------- markdown

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _footnote(rows: list[list[str]]) -> list[str]:
    cells = {c for row in rows for c in row}
    notes = []
    if NO_RUN in cells:
        notes.append(f"{NO_RUN} no finished run of this cell")
    if NOT_LOGGED in cells:
        notes.append(f"{NOT_LOGGED} the cell's runs did not log this measurement")
    return ["", f"<sub>{'; '.join(notes)}; see [Missing cells](#missing-cells).</sub>", ""] if notes else [""]


def metric_row(study: Study, model: str, compression: float, metric: Metric) -> list[str]:
    row = []
    for p in study.pruners:
        s = study.stat(model, p, compression, metric.key)
        row.append(s.fmt(metric.fmt) if s else study.mark(model, p, compression, metric.key))
    return row


def layer_stats(study: Study, pruner: str, column: str) -> tuple[list[dict], dict[str, Stat]] | None:
    """Per-layer values of `column` in layers.json over the runs of (main, pruner, focus)."""
    runs = study.cell(study.main, pruner, study.opts.focus)
    tables = [t for t in (study.artifacts.layers(r.id) for r in runs) if t]
    values: dict[str, list[float]] = defaultdict(list)
    for t in tables:
        for row in t:
            if row.get(column) is not None:
                values[row["layer"]].append(float(row[column]))
    if not values:
        return None
    return tables[0], {layer: Stat(v) for layer, v in values.items()}


def settings_section(study: Study) -> list[str]:
    """The protocol as the runs logged it, one line per setting; a setting with several
    values among the runs is flagged with the runs holding each."""
    runs = study.runs
    lines = ["## Settings", "",
             f"Read from the {len(runs)} finished prune runs of experiment `{study.opts.experiment}` "
             f"(id {study.experiment.experiment_id}) at `{public_uri(mlflow.get_tracking_uri())}`.", ""]
    models = Counter(r.model for r in runs)
    lines.append("- **Models**: " + ", ".join(f"{model_label(m)} ({n} runs)" for m, n in models.items()))
    flagged = 0

    def describe(key: str, title: str, group: list[Run], suffix: str = "") -> None:
        nonlocal flagged
        values: dict[str, list[Run]] = defaultdict(list)
        for r in group:
            v = r.setting(key)
            values["(not logged)" if v is None else v or "(none)"].append(r)
        if len(values) == 1:
            lines.append(f"- **{title}**{suffix}: `{next(iter(values))}`")
            return
        flagged += 1
        parts = []
        for v, rs in sorted(values.items(), key=lambda kv: -len(kv[1])):
            names = ", ".join(r.label for r in rs[:4]) + (f", … {len(rs) - 4} more" if len(rs) > 4 else "")
            parts.append(f"`{v}` in {len(rs)} runs ({names})")
        lines.append(f"- **{title}**{suffix}: ⚠ differs between runs: " + "; ".join(parts))

    for key, title in SETTINGS:
        if key == "iterations":  # differs by design between pruners (SynFlow: 100 rounds)
            for p in sorted({r.pruner for r in runs}):
                describe(key, title, [r for r in runs if r.pruner == p], f" ({pruner_label(p)})")
        else:
            describe(key, title, runs)
    lines.append("")
    if flagged:
        lines += [f"⚠ {flagged} setting(s) differ between runs: the runs above are not one protocol, "
                  "compare the flagged cells with care.", ""]
    for why, rs in study.excluded.items():
        lines.append(f"- Not in the tables: {len(rs)} run(s) with {why}: " + ", ".join(r.label for r in rs[:6])
                     + (" …" if len(rs) > 6 else ""))
    if study.skipped:
        lines.append("- Ignored (not FINISHED): " + ", ".join(f"{n} {s}" for s, n in study.skipped.items()))
    return lines + [""]


SETTINGS = [
    ("dataset", "Dataset"), ("dataset_source", "Data copy"), ("dataset_sha256", "Dataset SHA-256"), ("train_examples", "Training examples"),
    ("test_examples", "Test examples"), ("optimizer", "Optimizer"), ("lr", "Learning rate"),
    ("weight_decay", "Weight decay"), ("lr_drops", "LR drops (epochs)"), ("batch_size", "Batch size (train)"),
    ("test_batch_size", "Batch size (test)"), ("pre_epochs", "Pre-training epochs"),
    ("post_epochs", "Training epochs"), ("prune_per_class", "Pruning data (examples per class)"),
    ("prune_batch_size", "Batch size (pruning)"), ("scope", "Mask scope"), ("schedule", "Pruning schedule"),
    ("iterations", "Pruning iterations"), ("device", "Device"), ("torch_version", "PyTorch"),
    ("mlflow_version", "MLflow"), ("prunetrack_version", "prunetrack"), ("git_commit", "Git commit"),
]


def command_for(study: Study, model: str, pruner: str, compression: float) -> str:
    """The `mlflow run` command that would produce a cell under the protocol of the runs
    found: every MLproject parameter whose usual value among the runs is not its default."""
    params = {"model": model, "pruner": pruner, "compression": f"{compression:g}", "dataset": study.dataset}
    for f in config.fields():
        if not f.metadata.get("mlproject") or f.name in params or f.name == "device":
            continue
        group = [r for r in study.runs if r.pruner == pruner] if f.name == "iterations" else study.runs
        seen = Counter(r.setting(f.name) for r in group if r.setting(f.name) is not None)
        if not seen:
            continue
        value = seen.most_common(1)[0][0]
        default = _norm(f.default)
        if f.name == "iterations" and value in ("0", _norm(_default_iterations(pruner))):
            continue
        if value != default:
            params[f.name] = value
    args = " ".join(f"-P {k}={_shell(v)}" for k, v in params.items())
    return f"mlflow run . -e prune --experiment-name {_shell(study.opts.experiment)} {args}"


def _default_iterations(pruner: str) -> int:
    from prunetrack import pruning

    return pruning.DEFAULT_ITERATIONS.get(pruner, 1)


def _shell(value: str) -> str:
    import shlex

    return shlex.quote(str(value))


# ---------------------------------------------------------------------------- figures

def _colors(pruners: list[str]) -> dict[str, str]:
    return {p: f"C{i}" for i, p in enumerate(pruners)}


def _save(fig: Figure, path: str) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")


def figure_vs_compression(study: Study, metric: Metric, path: str) -> bool:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    colors, drawn = _colors(study.pruners), False
    for p in study.pruners:
        points = [(c, s) for c in study.compressions if (s := study.stat(study.main, p, c, metric.key))]
        if not points:
            continue
        drawn = True
        xs = [c for c, _ in points]
        ax.errorbar(xs, [s.mean * metric.scale for _, s in points], yerr=[s.std * metric.scale for _, s in points],
                    marker="o", capsize=3, color=colors[p], label=pruner_label(p))
    if not drawn:
        return False
    base, _ = study.baseline(study.main, metric.key)
    if base is not None:  # at 1x no pruner removes a weight: one dense reference for every curve
        ax.axhline(base.mean * metric.scale, color="0.4", ls=":", label=f"dense (1x), n={base.n}")
    ax.set_xscale("log")
    ax.set_xticks(study.compressions, [f"{c:g}x" for c in study.compressions])
    ax.minorticks_off()
    ax.set_xlabel("compression (prunable weights before / after)")
    ax.set_ylabel(f"{metric.title}, {metric.unit}")
    ax.set_title(f"{model_label(study.main)}: {metric.title.lower()}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return True


def figure_layer_density(study: Study, path: str) -> bool:
    fig = Figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    colors, layers = _colors(study.pruners), None
    for p in study.pruners:
        found = layer_stats(study, p, "density")
        if not found:
            continue
        rows, stats = found
        layers = layers or [row["layer"] for row in rows]
        ax.errorbar(range(len(layers)), [stats[n].mean if n in stats else math.nan for n in layers],
                    yerr=[stats[n].std if n in stats else 0 for n in layers], marker="o", ms=3, capsize=2,
                    color=colors[p], label=pruner_label(p))
    if layers is None:
        return False
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    ax.set_ylabel("density (fraction of weights kept)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{model_label(study.main)} at {study.opts.focus:g}x: per-layer density")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return True


def figure_histograms(hist: dict, title: str, path: str) -> None:
    layers = list(hist["layers"].items())
    cols = math.ceil(math.sqrt(len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(2.4 * cols, 1.9 * rows))
    for i, (name, h) in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        for which, color in (("init", "0.6"), ("final", "C0")):
            if h.get(which) and len(h[which]["counts"]):
                ax.stairs(h[which]["counts"], h[which]["edges"], color=color, fill=which == "init",
                          alpha=0.6 if which == "init" else 1.0, label=which)
        ax.set_title(f"{name} (d={h.get('density', math.nan):.3f})", fontsize=6)
        ax.tick_params(labelsize=5)
        if i == 0:
            ax.legend(fontsize=5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def figure_losses(study: Study, path: str) -> list[tuple[Run, list, list]]:
    """Train and test loss per epoch of every run of (main, pruner, focus), one panel per
    pruner; returns the histories for the findings."""
    client = MlflowClient()
    panels = [(p, study.cell(study.main, p, study.opts.focus)) for p in study.pruners]
    panels = [(p, rs) for p, rs in panels if rs]
    if not panels:
        return []
    fig = Figure(figsize=(3.2 * len(panels), 3.0))
    histories = []
    for i, (p, rs) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, r in enumerate(rs):
            train = sorted((m.step, m.value) for m in client.get_metric_history(r.id, "train_loss"))
            test = sorted((m.step, m.value) for m in client.get_metric_history(r.id, "test_loss"))
            histories.append((r, train, test))
            label = f"seed {r.seed}"
            if train:
                ax.plot(*zip(*train), marker=".", color=f"C{j}", label=f"train, {label}")
            if test:
                ax.plot(*zip(*test), marker=".", ls="--", color=f"C{j}", label=f"test, {label}")
        ax.set_title(f"{pruner_label(p)} at {study.opts.focus:g}x", fontsize=9)
        ax.set_xlabel("epoch")
        if i == 0:
            ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    return histories


# ---------------------------------------------------------------------------- the report

def build_report(opts: ReportOptions) -> str:
    """Write the report and its figures; returns the path of REPORT.md."""
    study = collect(opts)
    name = opts.name or re.sub(r"[^A-Za-z0-9._-]+", "-", opts.experiment).strip("-") or "report"
    out = os.path.join(opts.output_dir, name)
    os.makedirs(out, exist_ok=True)
    for old in os.listdir(out):  # a re-run must not leave figures of runs since removed
        if old.endswith(".png") or old == "REPORT.md":
            os.remove(os.path.join(out, old))
    text = render(study, out)
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as fh:
        fh.write(text)
    log_report_run(opts.experiment, name, out)
    return path


def render(study: Study, out: str) -> str:
    s, M, F = study, model_label(study.main), study.opts.focus
    header = ["Model"] + [pruner_label(p) for p in s.pruners]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# Pruning at initialization: {study.opts.experiment}", "",
          f"Generated {now} by `prunetrack report` from the MLflow tracking server; every number below "
          f"is read from the runs. Cells with several runs (seeds) show mean ± std (n); {NO_RUN} marks "
          f"a cell without a finished run, {NOT_LOGGED} one whose runs did not log the measurement.", ""]
    md += settings_section(s)

    # Tables 1-4.
    tables = []
    rows = [[model_label(m)] + metric_row(s, m, F, ACCURACY) for m in s.models]
    tables += [f"**Table 1.** Test accuracy (top-1, %) at {F:g}x compression, one row per model, one "
               f"column per pruner.", ""] + _table(header, rows) + _footnote(rows)
    for n, metric in ((2, ACCURACY), (3, TEST_TIME), (4, FLOPS)):
        rows = [[f"{c:g}x"] + metric_row(s, s.main, c, metric) for c in s.compressions]
        what = {2: "Test accuracy (top-1, %) of",
                3: "Testing time (ms, whole test set, median over repeats) of",
                4: "Effective FLOPs (millions, 2 x MACs over the weights that survive) of"}[n]
        tables += [f"**Table {n}.** {what} {M} against compression, one column per pruner.", ""]
        tables += _table(["Compression"] + header[1:], rows) + _footnote(rows)

    # Tables 5-6: per layer at the focus ratio.
    density = {p: layer_stats(s, p, "density") for p in s.pruners}
    flops = {p: layer_stats(s, p, "flops_effective") for p in s.pruners}
    dense_flops = next((f for p in s.pruners if (f := layer_stats(s, p, "flops_dense"))), None)
    reference = next((d[0] for d in density.values() if d), None)
    if reference is None:
        tables += [f"**Table 5.** Per-layer sparsity of {M} at {F:g}x: no run of this model at {F:g}x "
                   "logged layers.json.", ""]
        for p in s.pruners:
            s.mark(s.main, p, F, "layers.json")
    else:
        def layer_cell(found, p, layer, fmt, what):
            if found and layer in found[1]:
                return found[1][layer].fmt(fmt)
            return s.mark(s.main, p, F, what)

        # Sparsity is what the table states (share pruned, %); layers.json logs density.
        sparsity = {p: d and (d[0], {k: Stat([100 * (1 - v) for v in st.values]) for k, st in d[1].items()})
                    for p, d in density.items()}
        rows5, rows6 = [], []
        for row in reference:
            layer = row["layer"]
            rows5.append([f"`{layer}`", str(row.get("shape", "")), f"{int(row['params']):,}"]
                         + [layer_cell(sparsity[p], p, layer, lambda x: f"{x:.2f}", "layers.json")
                            for p in s.pruners])
            dense = (f"{dense_flops[1][layer].mean / 1e6:,.2f}" if dense_flops and layer in dense_flops[1]
                     else NOT_LOGGED)
            rows6.append([f"`{layer}`", dense]
                         + [layer_cell(flops[p], p, layer, lambda x: f"{x / 1e6:,.2f}", "per-layer FLOPs")
                            for p in s.pruners])
        tables += [f"**Table 5.** Per-layer sparsity of {M} at {F:g}x: % of each layer's weights pruned "
                   "(from each run's layers.json), one column per pruner.", ""]
        tables += _table(["Layer", "Shape", "Params"] + header[1:], rows5) + _footnote(rows5)
        tables += [f"**Table 6.** Per-layer FLOPs of {M} at {F:g}x (millions; dense, then effective for "
                   "each pruner).", ""]
        tables += _table(["Layer", "Dense"] + header[1:], rows6) + _footnote(rows6)
    md += ["## Tables", ""] + tables

    md += ["## Figures", ""] + figures(s, out)
    md += ["## Findings", ""] + findings(s) + [""]
    md += synflow_paper_section(s)
    md += missing_section(s)
    return "\n".join(md).rstrip() + "\n"


def figures(s: Study, out: str) -> list[str]:
    M, F = model_label(s.main), s.opts.focus
    md, n = [], 0

    def add(file: str, caption: str) -> None:
        nonlocal n
        n += 1
        md.extend([f"![Figure {n}]({file})", "", f"**Figure {n}.** {caption}", ""])

    for metric, file in ((ACCURACY, "accuracy_vs_compression.png"), (TEST_TIME, "test_time_vs_compression.png"),
                         (FLOPS, "flops_vs_compression.png")):
        if figure_vs_compression(s, metric, os.path.join(out, file)):
            add(file, f"{metric.title} of {M} against compression (log scale), one curve per pruner; "
                      "error bars: std over seeds where a cell has several runs.")
        else:
            md += [f"*No figure of `{metric.key}` against compression: no run of {M} logged it.*", ""]
    if figure_layer_density(s, os.path.join(out, "layer_density.png")):
        add("layer_density.png", f"Per-layer density (fraction of weights kept) of {M} at {F:g}x, one curve "
                                 "per pruner, layers in network order; error bars: std over seeds.")
    for p in s.pruners:
        runs = s.cell(s.main, p, F)
        run = next((r for r in runs if s.artifacts.json(r.id, "histograms.json")), None)
        if run is None:
            if runs:
                s.mark(s.main, p, F, "histograms.json")
            continue
        file = f"weight_histograms_{p}.png"
        figure_histograms(s.artifacts.json(run.id, "histograms.json"),
                          f"{M}, {pruner_label(p)}, {F:g}x (run {run.label})", os.path.join(out, file))
        add(file, f"Weight histograms of {M} pruned by {pruner_label(p)} at {F:g}x, one panel per layer: "
                  f"surviving weights at initialization (grey) and after training (blue), d = layer density; "
                  f"from run {run.label}.")
    s.histories = figure_losses(s, os.path.join(out, "loss_curves.png"))
    if s.histories:
        add("loss_curves.png", f"Training (solid) and test (dashed) loss per epoch of every run of {M} at "
                               f"{F:g}x, one panel per pruner: whether the epoch count lets training converge.")
    return md


def findings(s: Study) -> list[str]:
    M, F, out = s.main, s.opts.focus, []
    # Best pruner per ratio.
    for c in s.compressions:
        stats = {p: st for p in s.pruners if (st := s.stat(M, p, c, ACCURACY.key))}
        if len(stats) < 2 or c == 1.0:
            continue
        best = max(stats, key=lambda p: stats[p].mean)
        rest = sorted((p for p in stats if p != best), key=lambda p: -stats[p].mean)
        out.append(f"- At {c:g}x, **{pruner_label(best)}** has the highest test accuracy, "
                   f"{stats[best].mean:.2f}% {cell_name(M, best, c)}, "
                   f"{stats[best].mean - stats[rest[0]].mean:.2f} points above {pruner_label(rest[0])} "
                   f"{cell_name(M, rest[0], c)}"
                   + (f" and {stats[best].mean - stats[rest[-1]].mean:.2f} above {pruner_label(rest[-1])} "
                      f"{cell_name(M, rest[-1], c)}" if len(rest) > 1 else "") + ".")
    # Where each pruner falls more than 1 point below dense.
    base, base_runs = s.baseline(M, ACCURACY.key)
    if base is None:
        out.append(f"- No dense baseline: no finished run of {model_label(M)} at 1x, so no drop below it "
                   "can be stated.")
    else:
        where = f"{cell_name(M, None, 1.0)} ({base.n} run{'s' * (base.n > 1)})"
        for p in s.pruners:
            tested = [(c, st) for c in s.compressions if c > 1 and (st := s.stat(M, p, c, ACCURACY.key))]
            if not tested:
                continue
            drop = next(((c, st) for c, st in tested if st.mean < base.mean - 1.0), None)
            if drop:
                c, st = drop
                out.append(f"- {pruner_label(p)} first falls more than 1 point below the dense baseline at "
                           f"**{c:g}x**: {st.mean:.2f}% {cell_name(M, p, c)} vs {base.mean:.2f}% {where}.")
            else:
                top = tested[-1]
                out.append(f"- {pruner_label(p)} stays within 1 point of the dense baseline ({base.mean:.2f}% "
                           f"{where}) up to the highest ratio run, {top[0]:g}x: {top[1].mean:.2f}% "
                           f"{cell_name(M, p, top[0])}.")
    # Layers pruned most and least, and layer collapse.
    for p in s.pruners:
        found = layer_stats(s, p, "density")
        if not found:
            continue
        stats = found[1]
        lo = min(stats, key=lambda k: stats[k].mean)
        hi = max(stats, key=lambda k: stats[k].mean)
        out.append(f"- {pruner_label(p)} at {F:g}x {cell_name(M, p, F)} prunes `{lo}` most (density "
                   f"{stats[lo].mean:.4f}) and `{hi}` least (density {stats[hi].mean:.4f}).")
    collapsed = [(r, r.tags["layer_collapse"]) for r in s.runs if r.model == M and r.tags.get("layer_collapse")]
    empty = [(r, row["layer"]) for r in s.runs if r.model == M and r.compression == F
             for row in (s.artifacts.layers(r.id) or []) if float(row.get("density", 1)) == 0.0]
    if collapsed:
        for r, layers in collapsed:
            out.append(f"- Layer collapse in {cell_name(M, r.pruner, r.compression)} run {r.label}: every weight "
                       f"of {', '.join(f'`{x}`' for x in layers.split(','))} was pruned.")
    else:
        checked = sum(1 for r in s.runs if r.model == M)
        extra = f"; layers.json shows {len(empty)} empty layer(s) at {F:g}x" if empty else ""
        out.append(f"- No layer collapse: none of the {checked} runs of {model_label(M)} tagged `layer_collapse`"
                   f"{extra}.")
    out += speedup_findings(s)
    for r, train, test in s.histories:
        if len(test) < 2:
            out.append(f"- {cell_name(M, r.pruner, r.compression)} run {r.label} logged {len(test)} epoch(s) of "
                       "test loss: too few to tell whether training converged.")
            continue
        best_epoch, best = min(test, key=lambda sv: sv[1])
        last_epoch, last = test[-1]
        trend = ("still falling at the last epoch" if best_epoch == last_epoch
                 else f"lowest at epoch {best_epoch} ({best:.4f}), {last - best:+.4f} by the last")
        out.append(f"- Test loss of {cell_name(M, r.pruner, r.compression)} run {r.label} over {last_epoch} "
                   f"epochs: {trend} (final {last:.4f}; train loss {train[-1][1]:.4f}).")
    return out or ["- Not enough runs for any comparison."]


def speedup_findings(s: Study) -> list[str]:
    """Measured testing-time speedup over the dense baseline against the speedup FLOPs predict."""
    M = s.main
    base, _ = s.baseline(M, TEST_TIME.key)
    if base is None:
        return [f"- Testing time against theoretical speedup: no dense (1x) run of {model_label(M)} logged "
                "`test_time`."]
    out, missing = [], []
    for c in s.compressions:
        if c == 1.0:
            continue
        for p in s.pruners:
            runs = s.cell(M, p, c)
            t = s.stat(M, p, c, TEST_TIME.key)
            theo = [r.metrics.get("theoretical_speedup") or
                    (r.metrics["flops_dense"] / r.metrics["flops_effective"]
                     if r.metrics.get("flops_effective") and "flops_dense" in r.metrics else None) for r in runs]
            theo = [x for x in theo if x]
            if t is None:
                continue
            if not theo:
                missing.append(cell_name(M, p, c))
                continue
            measured = base.mean / t.mean
            out.append(f"- {cell_name(M, p, c)}: FLOPs predict a {statistics.fmean(theo):.2f}x speedup; measured "
                       f"testing time {t.mean * 1e3:.1f} ms vs {base.mean * 1e3:.1f} ms dense "
                       f"{cell_name(M, None, 1.0)} is a {measured:.2f}x speedup "
                       f"({measured / statistics.fmean(theo):.0%} of the predicted).")
    if missing:
        out.append(f"- No FLOPs logged for {', '.join(missing)}, so their measured testing time cannot be "
                   "compared with a theoretical speedup.")
    return out


# The SynFlow paper's training protocol for VGG-16 on CIFAR-10 (Tanaka et al. 2020,
# "Pruning neural networks without any data by iteratively conserving synaptic flow",
# hyperparameters as released with its code), against which the study's protocol differs.
SYNFLOW_PAPER = [
    ("model", "Model", "VGG-16 with BatchNorm"),
    ("optimizer", "Optimizer", "SGD, momentum 0.9 (Nesterov)"),
    ("lr", "Learning rate", "0.1"),
    ("lr_drops", "LR drops (epochs)", "60, 120 (x0.1)"),
    ("weight_decay", "Weight decay", "1e-4"),
    ("batch_size", "Batch size (train)", "128"),
    ("post_epochs", "Training epochs", "160"),
    ("iterations", "SynFlow iterations", "100"),
    ("prune_per_class", "Pruning data (examples per class)", "10"),
    ("dataset_source", "Data", "official CIFAR-10 release"),
]


def synflow_paper_section(s: Study) -> list[str]:
    """How the runs' protocol differs from the SynFlow paper's, and where to compare: the
    paper gives VGG-16/CIFAR-10 accuracies as curves (its Figure 6), not as a table."""
    model = s.main  # the model of Table 2 and the accuracy figure
    if s.dataset != "cifar10" or not model.startswith("vgg16"):
        return []
    runs = [r for r in s.runs if r.model == model]
    rows = []
    for key, title, theirs in SYNFLOW_PAPER:
        if key == "model":
            ours = model_label(model)
        else:
            group = [r for r in runs if r.pruner == "synflow"] if key == "iterations" else runs
            seen = Counter(r.setting(key) for r in group if r.setting(key) is not None)
            ours = " / ".join(f"{v or '(none)'}" for v, _ in seen.most_common()) or NOT_LOGGED
        rows.append([title, theirs, ours])
    md = ["## Comparison with the SynFlow paper", "",
          f"Tanaka et al. (2020) prune VGG-16 on CIFAR-10 with the same five methods and report top-1 test "
          f"accuracy against compression as curves (their Figure 6, VGG-16 / CIFAR-10 panel), not as a table; "
          f"read this report's Table 2 and its accuracy-against-compression figure against that panel. Their protocol differs from the one "
          f"these runs followed:", ""]
    md += _table(["Setting", "SynFlow paper", f"These runs ({model_label(model)})"], rows)
    md += ["", "What the differences predict: 160 epochs of SGD with lr drops and weight decay, and BatchNorm, "
               "reach a higher dense accuracy than a short Adam run without a schedule, so absolute accuracies "
               "here are expected below the paper's at every ratio, and the JPEG copy of the data lowers them "
               "a little more. "
               "The comparison that carries over is the shape: how far each pruner falls below the dense "
               "baseline as compression grows, and their order at each ratio.", ""]
    base, _ = s.baseline(model, ACCURACY.key)
    notes = []
    for c in s.compressions:
        st = s.stat(model, "synflow", c, ACCURACY.key)
        if st and base and c > 1:
            notes.append(f"{c:g}x: {st.mean:.2f}% ({st.mean - base.mean:+.2f} vs dense)")
    if base:
        md += [f"Here, dense {model_label(model)} reaches {base.mean:.2f}% {cell_name(model, None, 1.0)}; "
               "SynFlow: " + ("; ".join(notes) if notes else "no run above 1x") + ".", ""]
    return md


def missing_section(s: Study) -> list[str]:
    md = ["## Missing cells", ""]
    if not s.missing:
        return md + ["Every cell of every table has a finished run with its measurements.", ""]
    md += ["Each line is a cell shown as a missing mark above and the command that would produce it "
           "(the protocol of the runs found; add `-P seed=N` for more seeds).", ""]
    def order(key):
        model, pruner, c = key
        return (s.models.index(model) if model in s.models else len(s.models), model,
                s.pruners.index(pruner) if pruner in s.pruners else len(s.pruners), pruner, c)

    for (model, pruner, c), why in sorted(s.missing.items(), key=lambda kv: order(kv[0])):
        md += [f"- {cell_name(model, pruner, c)}: {'; '.join(sorted(why))}",
               f"  `{command_for(s, model, pruner, c)}`"]
    return md + [""]


def log_report_run(experiment: str, name: str, folder: str) -> str:
    """Log the report's files to a report run (the one `mlflow run` created, if any),
    tagged so later reports skip it."""
    with tracking.job_run(experiment, f"report-{name}") as run:
        tracking.log_tags({KIND_TAG: "report", "report.experiment": experiment, "report.name": name})
        mlflow.log_artifacts(folder)
        here = MlflowClient().get_experiment(run.info.experiment_id).name
        if here != experiment:  # `mlflow run` without --experiment-name logs to its own experiment
            print(f"report run {run.info.run_id} is in experiment {here!r}; pass --experiment-name "
                  f"{experiment} to `mlflow run` to keep it beside the runs it reports", flush=True)
        return run.info.run_id
