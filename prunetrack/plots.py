"""The figures of a job's weights, drawn from its logged records (histograms.json,
layers.json), so that a job logs them and the report redraws them from the same code.
matplotlib only: a bare Figure draws with Agg, with no pyplot state and no display."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def histogram_figure(record: dict[str, Any], title: str = "") -> Figure:
    """A grid with one panel per prunable layer: the surviving weights as they were when
    pruned (at initialization, or pre-trained for Magnitude) and after training, density in
    each title."""
    layers = record["layers"]
    n = max(len(layers), 1)
    cols = min(n, 6 if n > 16 else 4)
    rows = math.ceil(n / cols)
    width, height = 3.2 * cols, 2.4 * rows + 0.6
    fig = Figure(figsize=(width, height))
    # A fixed layout in inches and three ticks per axis: with a constrained layout and the
    # default ticks, measuring and drawing tick labels took a third of a small job's time.
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.75 / height,
                        wspace=0.3, hspace=0.65)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, h) in zip(axes.flat, layers.items()):
        if h.get("init"):
            ax.stairs(h["init"]["counts"], h["init"]["edges"], color="0.6", fill=True, label="kept, when pruned")
        if h.get("final"):
            ax.stairs(h["final"]["counts"], h["final"]["edges"], color="tab:blue", linewidth=1.2, label="trained")
        ax.set_title(f"{name}\ndensity {h.get('density', math.nan):.3g}", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
        ax.xaxis.get_offset_text().set_fontsize(6)
        ax.locator_params(nbins=3)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_visible(False)
    if layers:
        axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.suptitle(title or "surviving weights per layer", fontsize=10)
    fig.supxlabel("weight value", fontsize=8)
    fig.supylabel("count", fontsize=8)
    return fig


def density_figure(rows: list[dict[str, Any]], title: str = "") -> Figure:
    """A horizontal bar per prunable layer (in model order, top to bottom): its density."""
    names = [r["layer"] for r in rows]
    values = [r["density"] for r in rows]
    fig = Figure(figsize=(7, 1.2 + 0.22 * max(len(rows), 1)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y, values, color="tab:blue")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)  # room for the value labels
    ax.set_xlabel("density (fraction of weights kept)")
    for yi, v in zip(y, values):
        ax.text(v + 0.01, yi, f"{v:.3g}", va="center", fontsize=6)
    ax.set_title(title or "per-layer density", fontsize=10)
    return fig
