"""What a job measures after training: FLOPs, testing time, the per-layer table and
weight histograms (their figures are drawn by `prunetrack.plots`).

Units. FLOPs = 2 x multiply-accumulates (MACs); both are logged, so numbers compare
with papers that count either. FLOPs are counted by `torch.utils.flop_counter`
(`FlopCounterMode`) on one image, for the dense network: its registry prices
convolutions and matrix products (conv, mm, addmm, bmm, attention), the operations
where a network's arithmetic is. Element-wise work (bias adds, BatchNorm in eval mode,
ReLU, pooling, residual adds) costs nothing under that counter: it is a few operations
per activation against hundreds per output of a convolution. torchinfo, which also
prices biases and BatchNorm, agrees with the counter to within 0.1% on the models here
(a test checks it). A layer's *effective* FLOPs are its dense FLOPs times its density (the
fraction of its weights that survive), as in the pruning-at-initialization papers;
the network totals add whatever the counter found outside the prunable layers (zero
for the models here), unpruned.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunetrack import masking

HISTOGRAM_BINS = 50


# ---------------------------------------------------------------- FLOPs


@dataclass
class Flops:
    """Dense FLOPs per prunable layer and for the whole network, for one input image."""

    layers: dict[str, int]  # prunable layer name -> dense FLOPs
    total: int  # whole network, dense

    @property
    def other(self) -> int:
        """FLOPs the counter found outside the prunable layers (never pruned)."""
        return self.total - sum(self.layers.values())

    def effective(self, densities: dict[str, float]) -> dict[str, float]:
        """Per-layer effective FLOPs: dense FLOPs times the layer's density."""
        return {name: flops * densities[name] for name, flops in self.layers.items()}

    def effective_total(self, densities: dict[str, float]) -> float:
        return self.other + sum(self.effective(densities).values())


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> Flops:
    """Count the dense FLOPs of `model` on `example` (one image, batch dimension
    included), per prunable layer and in total. The model runs once in eval mode (so
    BatchNorm statistics are untouched) and is returned to its previous mode. The
    weights' values, zeros included, do not change the count."""
    if example.dim() < 2 or example.shape[0] != 1:
        raise ValueError(f"count_flops needs a single example with a batch dimension of 1, "
                         f"got shape {tuple(example.shape)}")
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    # The counter names modules by their path under the root, prefixed by the root's class.
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    layers = {}
    for name in masking.prunable_layers(model):
        counts = per_module.get(f"{root}.{name}")
        if counts is None:
            raise RuntimeError(f"the FLOP counter saw no call of prunable layer {name!r}; "
                               f"is it used in {root}.forward?")
        layers[name] = int(sum(counts.values()))
    return Flops(layers, int(counter.get_total_flops()))


# ---------------------------------------------------------------- timing


@dataclass
class Timing:
    result: Any  # what the warm-up call returned
    times: list[float]  # seconds, one per timed repeat

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def device_sync(device: torch.device | str | None) -> Callable[[], None]:
    """A function that waits for all queued work on `device` (a no-op on the CPU, whose
    work is done when the call returns)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_repeats(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1,
                 device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Call `fn` `warmup` times untimed (kernel selection, caches, lazy initialization),
    then `repeats` times, each timed between two device synchronizations so that queued
    asynchronous work is inside the measurement. Returns the warm-up's (or, with no
    warm-up, the first repeat's) result and the per-repeat times; `.median` is robust
    to a repeat disturbed by other work on the machine."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    sync = device_sync(device)
    result, have_result = None, False
    for _ in range(warmup):
        result, have_result = fn(), True
    times = []
    for _ in range(repeats):
        sync()
        start = clock()
        out = fn()
        sync()
        times.append(clock() - start)
        if not have_result:
            result, have_result = out, True
    return Timing(result, times)


# ---------------------------------------------------------------- per-layer table


def layer_rows(model: nn.Module, flops: Flops) -> list[dict[str, Any]]:
    """One row per prunable layer: layer, type, shape, params, remaining, density,
    flops_dense, flops_effective."""
    rows = []
    for name, m in masking.prunable_layers(model).items():
        mask = m.prune_mask
        remaining = int(mask.sum())
        density = remaining / mask.numel()  # as in `densities`
        rows.append({"layer": name, "type": type(m).__name__, "shape": "x".join(map(str, mask.shape)),
                     "params": mask.numel(), "remaining": remaining, "density": density,
                     "flops_dense": flops.layers[name], "flops_effective": flops.layers[name] * density})
    return rows


def densities(model: nn.Module) -> dict[str, float]:
    """Layer name -> fraction of its weights that survive."""
    return {name: int(m.sum()) / m.numel() for name, m in masking.get_masks(model).items()}


# ---------------------------------------------------------------- weight histograms


def surviving_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> its surviving weights (entries where the mask is True), flattened,
    copied to the CPU: a snapshot that later training does not change."""
    return {name: m.weight.detach()[m.prune_mask].to("cpu", torch.float32, copy=True)
            for name, m in masking.prunable_layers(model).items()}


def histogram(values: torch.Tensor, lo: float, hi: float, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """Bin edges and counts of `values` over [lo, hi]. Counts are exact integers (numpy)."""
    counts, edges = np.histogram(values.double().numpy(), bins=bins, range=(lo, hi))
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}


def histogram_record(init: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
                     layer_density: dict[str, float], bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """The `histograms.json` document: {"bins", "layers": {name: {"density", "init", "final"}}}
    from two `surviving_weights` snapshots. Both histograms of a layer share its bin
    edges (spanning the values of both), so they compare bin by bin; the counts sum to
    the number of surviving weights (all zero for a layer with none)."""
    layers = {}
    for name, after in final.items():
        before = init[name]
        both = torch.cat([before, after])
        lo, hi = (float(both.min()), float(both.max())) if both.numel() else (0.0, 1.0)
        if lo == hi:  # a single distinct value: give the bins some width around it
            lo, hi = lo - 0.5, hi + 0.5
        layers[name] = {"density": layer_density[name], "init": histogram(before, lo, hi, bins),
                        "final": histogram(after, lo, hi, bins)}
    return {"bins": bins, "layers": layers}
