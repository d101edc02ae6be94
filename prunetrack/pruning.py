"""Pruners and the pruning engine.

A pruner is a scoring function: `score(model, batches) -> {layer name: scores}`, one
score per prunable weight, higher meaning more worth keeping. The engine (`prune`)
does everything else the same way for every pruner: rounds on a schedule, global or
per-layer ranking with exactly round(total / compression) survivors, the ablations,
and leaving the model as it found it apart from the mask.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from prunetrack import masking

Batches = list[tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------- scores

def random_scores(model: nn.Module, batches: Batches, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random pruning: i.i.d. standard-normal scores (data-free)."""
    return {name: torch.randn(m.weight.shape, generator=generator).to(m.weight.device)
            for name, m in masking.prunable_layers(model).items()}


def magnitude_scores(model: nn.Module, batches: Batches, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Magnitude pruning: |w| (data-free)."""
    return {name: m.weight.detach().abs().clone() for name, m in masking.prunable_layers(model).items()}


# The registry of named choices: name -> scoring function.
PRUNERS = {
    "rand": random_scores,
    "mag": magnitude_scores,
}
# Rounds of score-then-mask when `iterations` is 0.
DEFAULT_ITERATIONS = {"synflow": 100}
SCOPES = ("global", "local")
SCHEDULES = ("exponential", "linear")


# ---------------------------------------------------------------------------- masks from scores

def density_at(round_: int, rounds: int, compression: float, schedule: str) -> float:
    """Fraction of prunable weights kept after round `round_` of `rounds` (1-based)."""
    t = round_ / rounds
    if schedule == "exponential":
        return compression ** -t
    if schedule == "linear":
        return 1.0 - (1.0 - 1.0 / compression) * t
    raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with exactly `k` True entries at the highest scores. Ties at the
    threshold are broken by position, so a tie never keeps fewer (or more) than k."""
    flat = scores.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return keep.view_as(scores)
    if k >= flat.numel():
        return ~keep.view_as(scores)
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        keep[ties] = True
    return keep.view_as(scores)


def layer_quotas(sizes: list[int], k: int, caps: list[int]) -> list[int]:
    """Split k survivors over layers in proportion to their sizes (largest remainder),
    so every layer gets the same density up to rounding and the total is exactly k.
    No layer gets more than its cap (its surviving weights); any excess moves to the
    layers that have room."""
    total = sum(sizes)
    exact = [s * k / total for s in sizes]
    quota = [min(math.floor(e), c) for e, c in zip(exact, caps)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    while sum(quota) < k:
        progressed = False
        for i in by_remainder:
            if sum(quota) == k:
                break
            if quota[i] < caps[i]:
                quota[i] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"cannot keep {k} weights: only {sum(caps)} survive")
    return quota


def masks_from_scores(scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], k: int,
                      scope: str) -> dict[str, torch.Tensor]:
    """Keep exactly k weights among those alive, ranked globally or within each layer."""
    # Weights pruned in an earlier round can never come back.
    scores = {n: torch.where(alive[n], s, torch.full_like(s, -math.inf)) for n, s in scores.items()}
    names = list(scores)
    if scope == "global":
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        keep = keep_top(flat, k)
        out, offset = {}, 0
        for n in names:
            size = scores[n].numel()
            out[n] = keep[offset:offset + size].view_as(scores[n])
            offset += size
        return out
    if scope == "local":
        quotas = layer_quotas([scores[n].numel() for n in names], k, [int(alive[n].sum()) for n in names])
        return {n: keep_top(scores[n], q) for n, q in zip(names, quotas)}
    raise ValueError(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}")


def shuffle_within_layers(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Ablation: a random permutation of each layer's mask (same density, new positions)."""
    out = {}
    for n, m in masks.items():
        perm = torch.randperm(m.numel(), generator=generator).to(m.device)
        out[n] = m.reshape(-1)[perm].view_as(m)
    return out


# ---------------------------------------------------------------------------- the engine

@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor]
    rounds: int
    # Per layer: mean score and sum of the kept weights' scores, from the last round.
    score_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    collapsed: list[str] = field(default_factory=list)  # layers with no surviving weight


def prune(model: nn.Module, pruner: str, compression: float, batches: Batches | None = None,
          scope: str = "global", iterations: int = 0, schedule: str = "exponential",
          invert: bool = False, shuffle: bool = False, seed: int = 0) -> PruneResult:
    """Score and mask `model` in place so that round(total / compression) prunable
    weights survive. Returns the masks, also installed as each layer's `weight_mask`.

    Scoring runs in eval mode with gradients cleared before each round; afterwards the
    weights, buffers (BatchNorm statistics) and training mode are restored, and the
    pruned weights zeroed.
    """
    if pruner not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r}; choose one of: {', '.join(PRUNERS)}")
    if not compression >= 1:
        raise ValueError(f"compression must be >= 1 (prunable weights before / after), got {compression}")
    score_fn = PRUNERS[pruner]
    rounds = iterations or DEFAULT_ITERATIONS.get(pruner, 1)
    generator = torch.Generator().manual_seed(seed)
    masking.add_masks(model)
    layers = masking.prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    target = round(total / compression)

    was_training = model.training
    saved = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("weight_mask")}
    model.eval()
    try:
        for r in range(1, rounds + 1):
            k = target if r == rounds else round(total * density_at(r, rounds, compression, schedule))
            model.zero_grad(set_to_none=True)
            scores = {n: s.detach() for n, s in score_fn(model, batches, generator).items()}
            model.zero_grad(set_to_none=True)
            if invert:
                scores = {n: -s for n, s in scores.items()}
            alive = masking.get_masks(model)
            masks = masks_from_scores(scores, alive, k, scope)
            masking.set_masks(model, masks)
    finally:
        model.load_state_dict({**model.state_dict(), **saved})
        model.train(was_training)
    if shuffle:
        masks = shuffle_within_layers(masks, generator)
    masking.set_masks(model, masks)

    summary = {n: {"mean": float(scores[n].double().mean()),
                   "kept_sum": float(scores[n].double()[masks[n]].sum())} for n in masks}
    collapsed = [n for n, m in masks.items() if not m.any()]
    if collapsed:
        warnings.warn(f"layer collapse: no weight survives in {', '.join(collapsed)}", RuntimeWarning)
    return PruneResult(masks, rounds, summary, collapsed)
