"""Step 3: the report's figures (PNG files), drawn from the study's records only.

Each `figure_*` writes one file and says whether it drew anything; `draw` returns the
figures of the Figures section as (file, caption) entries, or a note where a figure
could not be drawn.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from prunetrack import plots
from prunetrack.report import tables
from prunetrack.report.records import (
    ACCURACY,
    FLOPS,
    OTHER_PRECISION,
    OTHER_TIMING,
    TIMED_TEST_TIME,
    Metric,
    Pretrain,
    Stat,
    Study,
    grouped,
    join_words,
    model_label,
    pruner_label,
)


def _colors(pruners: list[str]) -> dict[str, str]:
    return {p: f"C{i}" for i, p in enumerate(pruners)}


def _save(fig: Figure, path: str) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")


class Curves(NamedTuple):
    """What a figure against compression draws: per pruner, its points (compression, stat,
    hollow), and the cells it leaves out."""
    points: dict[str, list[tuple[float, Stat, bool]]]
    left_out: list[tuple[str, float]]

    @property
    def hollow(self) -> bool:
        """Whether any point is drawn hollow."""
        return any(h for points in self.points.values() for _, _, h in points)


def curves(study: Study, metric: Metric) -> Curves:
    """The points of each pruner's curve of `metric`. A testing time taken on another device
    or in another precision than most cells (§ in Table 3) is left out: it measures the
    machine, and on one axis it would dwarf the differences between networks. An accuracy
    trained in another precision (‡) stays, drawn hollow: the same task in other arithmetic."""
    points, left_out = {}, []
    for p in study.pruners:
        for c in study.compressions:
            s = study.stat(study.main, p, c, metric.key)
            if s is None:
                continue
            cell = study.cell(study.main, p, c)
            if metric.key == TIMED_TEST_TIME.key and tables.timed_elsewhere(study, cell):
                left_out.append((p, c))
                continue
            hollow = metric.key == ACCURACY.key and bool(study.other_precisions(cell))
            points.setdefault(p, []).append((c, s, hollow))
    return Curves(points, left_out)


def left_out_words(study: Study, left_out: list[tuple[str, float]]) -> str:
    """'Rand at 5x and 15x, SNIP at 5x' for the cells a figure leaves out."""
    at = grouped(left_out, lambda pc: pc[0])
    return join_words([f"{pruner_label(p)} at {join_words([f'{c:g}x' for _, c in at[p]])}"
                       for p in study.pruners if p in at])


def figure_vs_compression(study: Study, metric: Metric, path: str) -> Curves | None:
    """Draw `metric` against compression; the curves drawn, or None when there was nothing to draw."""
    drawn = curves(study, metric)
    if not drawn.points:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    colors = _colors(study.pruners)
    for p, points in drawn.points.items():
        xs = [c for c, _, _ in points]
        ys = [s.mean * metric.scale for _, s, _ in points]
        ax.errorbar(xs, ys, yerr=[s.std * metric.scale for _, s, _ in points],
                    marker="o", capsize=3, color=colors[p], label=pruner_label(p))
        hollow = [(x, y) for (x, y), (_, _, h) in zip(zip(xs, ys), points) if h]
        if hollow:
            ax.plot(*zip(*hollow), ls="", marker="o", mfc="white", mec=colors[p], zorder=3)
    base, runs = study.baseline(study.main, metric.key)
    if base is not None and not (metric.key == TIMED_TEST_TIME.key and tables.timed_elsewhere(study, runs)):
        # at 1x no pruner removes a weight: one dense reference for every curve
        ax.axhline(base.mean * metric.scale, color="0.4", ls=":", label=f"dense (1x), n={base.n}")
    if drawn.hollow:
        ax.plot([], [], ls="", marker="o", mfc="white", mec="0.3",
                label=f"{OTHER_PRECISION} trained in {join_words(study.other_precisions(study.runs))}")
    ax.set_xscale("log")
    ax.set_xticks(study.compressions, [f"{c:g}x" for c in study.compressions])
    ax.minorticks_off()
    ax.set_xlabel("compression (prunable weights before / after)")
    ax.set_ylabel(f"{metric.title}, {metric.unit}")
    ax.set_title(f"{model_label(study.main)}: {metric.title.lower()}")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return drawn


def figure_layer_density(study: Study, path: str) -> bool:
    fig = Figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    colors, layers = _colors(study.pruners), None
    for p in study.pruners:
        found = study.layer_stats(p, "density")
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
    """The job's own figure of its histograms.json (one panel per layer)."""
    plots.histogram_figure(hist, title).savefig(path, dpi=120)  # a fixed layout: no tight bbox needed


def figure_losses(study: Study, path: str) -> bool:
    """Train and test loss per epoch of every run of (main, pruner, focus), one panel per pruner."""
    panels = [(p, study.cell(study.main, p, study.opts.focus)) for p in study.pruners]
    panels = [(p, rs) for p, rs in panels if rs]
    if not panels:
        return False
    fig = Figure(figsize=(3.2 * len(panels), 3.0))
    for i, (p, rs) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for j, r in enumerate(rs):
            train, test = r.histories.get("train_loss", []), r.histories.get("test_loss", [])
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
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    return True


def figure_pretrain(pretrains: list[Pretrain], path: str) -> bool:
    """Each pre-training's train and test loss per epoch (left) and test top-1 (right),
    its best epoch marked."""
    if not any(p.histories.get("test_loss") for p in pretrains):
        return False
    fig = Figure(figsize=(10, 3.6))
    loss, top1 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for j, pre in enumerate(pretrains):
        h, color, tag = pre.histories, f"C{j}", f" ({pre.name})" if len(pretrains) > 1 else ""
        if h.get("train_loss"):
            loss.plot(*zip(*h["train_loss"]), marker=".", color=color, label=f"train{tag}")
        if h.get("test_loss"):
            loss.plot(*zip(*h["test_loss"]), marker=".", ls="--", color=color, label=f"test{tag}")
        if h.get("test_top1"):
            top1.plot(*zip(*h["test_top1"]), marker=".", color=color, label=f"test top-1{tag}")
        if "best_epoch" in pre.metrics:
            for ax in (loss, top1):
                ax.axvline(pre.metrics["best_epoch"], color=color, ls=":", alpha=0.7)
    loss.set_ylabel("loss")
    top1.set_ylabel("test top-1, %")
    for ax, what in ((loss, "loss"), (top1, "test top-1")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(f"pre-training: {what} per epoch (dotted: best epoch)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


def time_words(s: Study) -> str:
    if s.time_metric.key == TIMED_TEST_TIME.key:
        return "from the controlled timing pass (median over its rounds; Table 3 says how it was measured)"
    return "the jobs' own `test_time`, measured while training shared the machine: not comparable across cells"


def draw(s: Study, out: str) -> list[tuple[str, str]]:
    """The Figures section's figures, written under `out`: (file, caption), or ("", note)."""
    M, F = model_label(s.main), s.opts.focus
    entries = []
    for metric, file in ((ACCURACY, "accuracy_vs_compression.png"), (s.time_metric, "test_time_vs_compression.png"),
                         (FLOPS, "flops_vs_compression.png")):
        drawn = figure_vs_compression(s, metric, os.path.join(out, file))
        if drawn:
            extra = f" Testing time: {time_words(s)}." if metric is s.time_metric else ""
            if drawn.hollow:
                extra += (f" Hollow markers: cells trained in another precision than the study's {s.precision} "
                          f"({OTHER_PRECISION} in Tables 1-2).")
            if drawn.left_out:
                extra += (f" Left out: {left_out_words(s, drawn.left_out)}, timed on another device or in another "
                          f"precision than the others ({OTHER_TIMING} in Table 3), whose times would measure the "
                          "machine rather than the network.")
            entries.append((file, f"{metric.title} of {M} against compression (log scale), one curve per pruner; "
                                  f"error bars: std over seeds where a cell has several runs.{extra}"))
        else:
            entries.append(("", f"*No figure of `{metric.key}` against compression: no run of {M} logged it.*"))
    if figure_layer_density(s, os.path.join(out, "layer_density.png")):
        entries.append(("layer_density.png", f"Per-layer density (fraction of weights kept) of {M} at {F:g}x, one "
                                             "curve per pruner, layers in network order; error bars: std over seeds."))
    for p in s.pruners:
        run = s.histogram_run(p)
        if run is None:
            continue
        file = f"weight_histograms_{p}.png"
        figure_histograms(run.histograms, f"{M}, {pruner_label(p)}, {F:g}x (run {run.label})", os.path.join(out, file))
        when = "as pre-trained, when it pruned them" if run.pretrained else "at initialization"
        entries.append((file, f"Weight histograms of {M} pruned by {pruner_label(p)} at {F:g}x, one panel per layer: "
                              f"surviving weights {when} (grey) and after training (blue), d = layer "
                              f"density; from run {run.label}."))
    if figure_losses(s, os.path.join(out, "loss_curves.png")):
        entries.append(("loss_curves.png", f"Training (solid) and test (dashed) loss per epoch of every run of {M} at "
                                           f"{F:g}x, one panel per pruner: whether the epoch count lets training "
                                           "converge."))
    return entries
