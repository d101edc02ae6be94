"""The plain records every step of the report reads: runs, cells, statistics.

`collect` fills them from MLflow once; tables, figures and findings only read them, so
each step can be tested on records built by hand.
"""
from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from prunetrack import config
from prunetrack.progress import join_words, plural  # noqa: F401  (the report modules take them from here)

# The study's rows: a VGG16 and ResNet50. The VGG16 is the variant the runs used (with or
# without BatchNorm; both if both ran); with none, the default model, with BatchNorm.
VGG16_VARIANTS = ("vgg16_bn", "vgg16")
STUDY_MODELS = ("resnet50",)
STUDY_COMPRESSIONS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0)
STUDY_PRUNERS = ("rand", "mag", "snip", "grasp", "synflow")
PRUNER_LABELS = {"rand": "Rand", "mag": "Mag", "snip": "SNIP", "grasp": "GraSP", "synflow": "SynFlow"}
NO_RUN = "—"
NOT_LOGGED = "—*"
SHARED = "†"
OTHER_PRECISION = "‡"  # a cell trained in another precision than most of the study
OTHER_TIMING = "§"     # a cell timed on another device or in another precision than most
PRETRAINED_AGAIN = "¶"  # a cell pruned from a pre-training repeated, not exactly, after the one others prune
ABLATIONS = ("shuffle", "reinit", "invert")
TAG_FIRST = {"device", "precision"}  # the param says "auto", the tag names what the job used
UNSHARED_AT_1X = ("mag",)  # starts from pre-trained weights: its 1x is a network of its own
# What decides a training's trajectory: a dense run with these of a pre-training trains the same.
TWIN_KEYS = ("seed", "dataset_sha256", "train_subset", "optimizer", "lr", "weight_decay", "lr_drops", "lr_drop_rate",
             "batch_size", "precision")
CURVE_KEYS = ("train_loss", "test_loss", "test_top1")  # per-epoch metrics the figures draw
WEIGHTS_DIGEST = "weights_sha256"  # a pre-training's weights, hashed (tracking.weights_digest)


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
TIMED_TEST_TIME = Metric("timed_test_time", "Testing time (whole test set)", "ms", 1e3, 1)
FLOPS = Metric("flops_effective", "FLOPs (effective, 2 x MACs)", "MFLOPs", 1e-6, 1)


def setting(params: dict, tags: dict, key: str, tag_first: bool = True) -> str | None:
    """A run's setting as the job resolved it: `<key>_resolved` first, then the param, then
    the tag (the tag first for the settings whose param says "auto")."""
    sources = (params.get(f"{key}_resolved"), params.get(key), tags.get(key))
    if key in TAG_FIRST and tag_first:
        sources = (tags.get(key), *sources)
    for source in sources:
        if source is not None:
            return norm(source)
    return config.value_before(key)


@dataclass
class Run:
    """A FINISHED prune run as the report needs it. `histories`, `layers` and
    `histograms` hold what collect loaded for the runs whose figures and per-layer
    tables need them (metric histories as sorted (step, value) pairs)."""
    id: str
    name: str
    model: str
    pruner: str
    compression: float
    seed: str
    params: dict
    tags: dict
    metrics: dict
    histories: dict = field(default_factory=dict)
    layers: list | None = None
    histograms: dict | None = None

    def setting(self, key: str, tag_first: bool = True) -> str | None:
        return setting(self.params, self.tags, key, tag_first)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id[:8]})"

    @property
    def pretrained(self) -> bool:
        return bool(self.tags.get("pretrain_run"))

    @property
    def dense_from_scratch(self) -> bool:
        return self.compression == 1.0 and self.tags.get("dense") == "true" and not self.pretrained


@dataclass
class Pretrain:
    """A pre-training run that prune runs of the main model start from (tag `pretrain_run`)."""
    id: str
    name: str
    params: dict
    tags: dict
    metrics: dict
    histories: dict = field(default_factory=dict)  # CURVE_KEYS per epoch
    users: list = field(default_factory=list)        # the prune runs that start from it

    @property
    def label(self) -> str:
        return f"{self.name} ({self.id[:8]})"

    def setting(self, key: str) -> str | None:
        return setting(self.params, self.tags, key)

    @property
    def key(self) -> str:
        """Its settings' hash (tag `pretrain_hash`): two pre-trainings with one key are a repeat."""
        return self.tags.get("pretrain_hash", self.id)


def history_gap(a, b) -> dict[str, tuple[int, float]]:
    """{curve: (epochs both logged, the largest difference at any of them)} of two runs or
    pre-trainings."""
    gap = {}
    for k in CURVE_KEYS:
        x, y = dict(a.histories.get(k, [])), dict(b.histories.get(k, []))
        if common := x.keys() & y.keys():
            gap[k] = (len(common), max(abs(x[e] - y[e]) for e in common))
    return gap


def same_training(first: Pretrain, again: Pretrain) -> bool:
    """Whether `again` repeats `first` to the bit, so that Magnitude takes the same masks
    from either: by the digest of their weights (tag `weights_sha256`) where both have one;
    else the same precision, as many epochs, and every curve equal at every epoch (training
    here is deterministic: the Pre-training section checks it against a dense run of the same
    settings)."""
    if first.tags.get(WEIGHTS_DIGEST) and again.tags.get(WEIGHTS_DIGEST):
        return first.tags[WEIGHTS_DIGEST] == again.tags[WEIGHTS_DIGEST]
    if first.setting("precision") != again.setting("precision"):
        return False
    gap = history_gap(first, again)
    lengths = {len(p.histories.get(k, [])) for p in (first, again) for k in CURVE_KEYS}
    return bool(gap) and len(lengths) == 1 and all(v == 0 for _, v in gap.values())


def norm(value) -> str:
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


def pruner_name(name: str) -> str:
    """The pruner as prose names it."""
    return {"rand": "Random", "mag": "Magnitude"}.get(name, pruner_label(name))


def cell_name(model: str, pruner: str | None, compression: float) -> str:
    parts = [model_label(model)] + ([pruner_label(pruner)] if pruner else []) + [f"{compression:g}x"]
    return "[" + " · ".join(parts) + "]"


def names(runs, limit: int = 4) -> str:
    shown = ", ".join(r.label for r in runs[:limit])
    return shown + (f", … {len(runs) - limit} more" if len(runs) > limit else "")


def grouped(runs: list, key: Callable) -> dict:
    """`runs` by `key(run)`, the values in the order they first appear."""
    out: dict = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


def round_range(runs: list, key: str) -> tuple[float, float] | None:
    """The lowest `<key>_min` and highest `<key>_max` over `runs` (a timing's rounds), or None
    when they did not log both."""
    lo = [r.metrics[f"{key}_min"] for r in runs if f"{key}_min" in r.metrics]
    hi = [r.metrics[f"{key}_max"] for r in runs if f"{key}_max" in r.metrics]
    return (min(lo), max(hi)) if lo and hi else None


def timing_passes(runs) -> set[str]:
    """The controlled timing passes (their `timing.when` tags) that timed any of `runs`."""
    return {r.tags["timing.when"] for r in runs if "timing.when" in r.tags}


def n_words(ns) -> str:
    """How many runs each cell has: "n=1", or "n=1-3" when cells differ."""
    ns = sorted(set(ns))
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"


def value_range(values, fmt) -> str:
    """'lo-hi' of `values` as `fmt` writes them, or one value where both ends read the same."""
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


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
    experiment_id: str
    runs: list[Run]
    models: list[str]
    pruners: list[str]
    compressions: list[float]
    dataset: str
    main: str                                      # the model of tables 2-6
    tracking_uri: str = ""
    excluded: dict = field(default_factory=dict)   # why -> [Run] left out of the tables
    skipped: Counter = field(default_factory=Counter)  # status -> count of runs not FINISHED
    cells: dict = field(default_factory=dict)      # (model, pruner, compression) -> [Run]
    shared: dict = field(default_factory=dict)     # (model, pruner, 1.0) -> [Run]: the dense runs it shows
    time_metric: Metric = TEST_TIME                # timed_test_time when the main model has it
    pretrains: list = field(default_factory=list)  # [Pretrain] linked from the main model's runs
    pretrain_missing: list = field(default_factory=list)  # linked run ids not found
    missing: dict = field(default_factory=dict)    # (model, pruner, compression) -> {why}
    budget: int = 0                                # the tables' training epochs (post_epochs)
    longer: list = field(default_factory=list)     # [Run] at another budget, kept out of the tables

    def position(self, model: str | None = None, pruner: str | None = None) -> tuple:
        """Sort key: the order the options list models and pruners in, others after, by name."""
        rank = lambda items, x: (items.index(x), "") if x in items else (len(items), x or "")
        return (*rank(self.models, model), *rank(self.pruners, pruner))

    def twins(self, pre: Pretrain) -> list[Run]:
        """The dense runs that train what `pre` trained (its model from the same seed, on the
        same data, with the same optimizer settings, nothing pruned): their epochs should
        repeat the pre-training's first ones."""
        return [r for r in self.runs if r.dense_from_scratch and r.model == pre.setting("model")
                and all(r.setting(k) == pre.setting(k) for k in TWIN_KEYS)]

    def cell(self, model: str, pruner: str, compression: float) -> list[Run]:
        return self.cells.get((model, pruner, compression), [])

    def stat(self, model: str, pruner: str, compression: float, metric: str) -> Stat | None:
        values = [r.metrics[metric] for r in self.cell(model, pruner, compression) if metric in r.metrics]
        return Stat(values) if values else None

    def mark(self, model: str, pruner: str, compression: float) -> str:
        """The visible mark of a cell without the value: no run, or runs without the measurement."""
        return NOT_LOGGED if self.cell(model, pruner, compression) else NO_RUN

    def is_shared(self, model: str, pruner: str, compression: float) -> bool:
        """Whether the cell shows the dense run that Rand, SNIP, GraSP and SynFlow share at 1x
        (the cells filled from it, and the cell whose run it is)."""
        key = (model, pruner, compression)
        if key in self.shared:
            return True
        sources = {r.id for k, rs in self.shared.items() if k[0] == model and k[2] == compression for r in rs}
        return bool(sources) and {r.id for r in self.cell(*key)} == sources

    def shared_runs(self, model: str) -> list[Run]:
        seen = {r.id: r for k, rs in self.shared.items() if k[0] == model for r in rs}
        return list(seen.values())

    def baseline_runs(self, model: str) -> tuple[list[Run], list[Run]]:
        """The dense (1x) baseline: every 1x run of the model, each once, whatever its pruner
        (at 1x no pruner removes a weight); and the 1x runs left out because they start from
        a pre-training (not the dense network trained from scratch)."""
        seen: dict[str, Run] = {}
        for (m, _, c), rs in self.cells.items():
            if m == model and c == 1.0:
                for r in rs:
                    seen.setdefault(r.id, r)
        runs = [r for r in seen.values() if not r.pretrained]
        return runs, [r for r in seen.values() if r.pretrained]

    def baseline(self, model: str, metric: str) -> tuple[Stat | None, list[Run]]:
        runs, _ = self.baseline_runs(model)
        values = [r.metrics[metric] for r in runs if metric in r.metrics]
        return (Stat(values) if values else None), runs

    def layer_stats(self, pruner: str, column: str) -> tuple[list[dict], dict[str, Stat]] | None:
        """Per-layer values of `column` in layers.json over the runs of (main, pruner, focus)."""
        runs = self.cell(self.main, pruner, self.opts.focus)
        tables = [r.layers for r in runs if r.layers]
        values: dict[str, list[float]] = {}
        for t in tables:
            for row in t:
                if row.get(column) is not None:
                    values.setdefault(row["layer"], []).append(float(row[column]))
        if not values:
            return None
        return tables[0], {layer: Stat(v) for layer, v in values.items()}

    def histogram_run(self, pruner: str) -> Run | None:
        """The run whose weight histograms stand for (main, pruner, focus)."""
        return next((r for r in self.cell(self.main, pruner, self.opts.focus) if r.histograms), None)

    def repeats(self) -> list[tuple[Pretrain, Pretrain]]:
        """(repeat, first) for each pre-training whose settings an earlier one had: imported
        first (exports carry no weights, so the Magnitude runs made since trained them again),
        then by name."""
        first: dict[str, Pretrain] = {}
        for pre in self.pretrains:
            first.setdefault(pre.key, pre)
        return [(pre, first[pre.key]) for pre in self.pretrains if first[pre.key] is not pre]

    def pretrained_again(self, runs: list[Run]) -> list[Run]:
        """The runs among `runs` that prune another version of a repeated pre-training (see
        repeats) than the one most runs prune, where the two do not repeat each other
        exactly (see same_training): they prune other weights than the rest. An exact repeat
        holds the same weights, so its runs are not marked (the Pre-training section says it
        repeated)."""
        marked = {u.id for minor, _ in self.minor_pretrains() for u in minor.users}
        return [r for r in runs if r.id in marked]

    def minor_pretrains(self) -> list[tuple[Pretrain, Pretrain]]:
        """(minor, main) for each version of a pre-training repeated not exactly that fewer
        runs prune than `main`, the version the most runs prune (the first, on a tie): while
        a study redoes the cells of a first pre-training from its repeat, the mark moves to
        whichever cells are fewer."""
        groups: dict[str, list[Pretrain]] = {}
        for again, first in self.inexact_repeats():
            groups.setdefault(first.key, [first]).append(again)
        pairs = []
        for group in groups.values():
            main = max(group, key=lambda pre: len(pre.users))  # max keeps the first of equals
            pairs += [(pre, main) for pre in group if pre is not main]
        return pairs

    def inexact_repeats(self) -> list[tuple[Pretrain, Pretrain]]:
        """The (repeat, first) pairs of repeats() whose repeat is not exact (see same_training)."""
        return [(again, first) for again, first in self.repeats() if not same_training(first, again)]

    @property
    def precision(self) -> str | None:
        """The precision most of the study's runs trained in."""
        return self.common("precision")

    def other_precisions(self, runs: list[Run]) -> list[str]:
        """The precisions among `runs` other than the study's own, sorted: a precision decides
        the arithmetic of training, so cells trained in another one differ by more than seeds."""
        return sorted({p for r in runs if (p := r.setting("precision")) and p != self.precision})

    def common(self, key: str, runs: list[Run] | None = None, tag_first: bool = True) -> str | None:
        """The most common value of a setting among `runs` (default: all), None if none logged it."""
        seen = Counter(v for r in (self.runs if runs is None else runs)
                       if (v := r.setting(key, tag_first)) is not None)
        return seen.most_common(1)[0][0] if seen else None
