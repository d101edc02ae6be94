"""Pruners and the pruning engine.

A pruner is a scoring function: `score(model, batches, generator) -> {layer name: scores}`,
one score per prunable weight, higher meaning more worth keeping. It sees the model in
eval mode with the current masks installed (pruned weights are zero) and gradients
cleared, and must not change the model; scoring functions take gradients with
`torch.autograd.grad` so that no `.grad` is left behind. The engine (`prune`)
does everything else the same way for every pruner: rounds on a schedule, global or
per-layer ranking with exactly round(total / compression) survivors, the ablations,
and leaving the model as it found it apart from the mask.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunetrack import config, masking, training

Batches = list[tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------------- scores

def random_scores(model: nn.Module, batches: Batches, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random pruning: i.i.d. standard-normal scores (data-free)."""
    return {name: torch.randn(m.weight.shape, generator=generator).to(m.weight.device)
            for name, m in masking.prunable_layers(model).items()}


def magnitude_scores(model: nn.Module, batches: Batches, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Magnitude pruning: |w| (data-free)."""
    return {name: m.weight.detach().abs().clone() for name, m in masking.prunable_layers(model).items()}


def _weights(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    layers = masking.prunable_layers(model)
    return list(layers), [m.weight for m in layers.values()]


def _require_data(batches: Batches | None, pruner: str) -> tuple[Batches, int]:
    """The pruning batches and their total number of examples; a clear error without them."""
    if not batches:
        raise ValueError(f"pruner {pruner!r} scores with data: pass pruning batches "
                         f"(a list of (inputs, labels)); only rand, mag and synflow are data-free")
    return batches, sum(len(y) for _, y in batches)


def _grad(output: torch.Tensor, weights: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    """d output / d weights, with zeros (not None) for a weight the output does not reach."""
    grads = torch.autograd.grad(output, weights, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]


def _loss_gradient(model: nn.Module, batches: Batches, n: int, weights: list[torch.Tensor],
                   temperature: float = 1.0) -> list[torch.Tensor]:
    """Gradient of the mean cross-entropy over all pruning examples (logits divided by
    `temperature`), accumulated batch by batch. Summing per-example losses and dividing by
    the example count makes it the gradient of one loss over the whole pruning set, as in
    the papers, however the set is split into batches."""
    total = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        loss = F.cross_entropy(model(x) / temperature, y, reduction="sum") / n
        for acc, g in zip(total, _grad(loss, weights)):
            acc += g
    return total


def snip_scores(model: nn.Module, batches: Batches, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """SNIP (Lee et al. 2019): connection sensitivity |dL/dw * w|.

    The paper differentiates the loss with respect to a multiplicative mask c at c = 1;
    since w * c is what the layer sees, dL/dc = dL/dw * w. L is the mean cross-entropy
    over the whole pruning set. (The paper also divides by the sum of all scores, which
    does not change the ranking.)"""
    batches, n = _require_data(batches, "snip")
    names, weights = _weights(model)
    grads = _loss_gradient(model, batches, n, weights)
    return {name: (g * w).detach().abs() for name, g, w in zip(names, grads, weights)}


# Softmax temperature of GraSP's loss (Wang et al. 2020, and its reference code).
GRASP_TEMPERATURE = 200.0


def grasp_scores(model: nn.Module, batches: Batches, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al. 2020): the Hessian-gradient product, sign convention below.

    With L the mean cross-entropy of logits / 200 over the pruning set, g = dL/dw and
    H = d^2L/dw^2 (both over the prunable weights only), removing w changes the gradient
    norm g^T g by about -2 w * (Hg). The paper's score is S = -w * (Hg) and it removes
    the weights with the highest S, i.e. those whose removal reduces gradient flow least
    (or increases it). We return `w * (Hg)` = -S and, as for every pruner here, keep the
    highest: the same ranking as the original code. Hg is computed by double backward:
    Hg = d/dw (g_detached . dL/dw)."""
    batches, n = _require_data(batches, "grasp")
    names, weights = _weights(model)
    g = [t.detach() for t in _loss_gradient(model, batches, n, weights, GRASP_TEMPERATURE)]
    hg = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        loss = F.cross_entropy(model(x) / GRASP_TEMPERATURE, y, reduction="sum") / n
        grads = _grad(loss, weights, create_graph=True)
        z = sum((gi * fi).sum() for gi, fi in zip(g, grads))
        for acc, h in zip(hg, _grad(z, weights)):
            acc += h
    return {name: (w.detach() * h).detach() for name, w, h in zip(names, weights, hg)}


def synflow_input_shape(batches: Batches | None) -> tuple[int, ...]:
    """One example of the data's shape (from the pruning batches when given)."""
    if batches:
        return (1, *batches[0][0].shape[1:])
    return (1, 3, 32, 32)


def synflow_scores(model: nn.Module, batches: Batches | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al. 2020): |dR/dθ * θ| with R = 1^T (prod_l |θ_l|) 1.

    Data-free: R is the summed output of the linearized network, every floating-point
    parameter and buffer (BatchNorm statistics included) replaced by its absolute value,
    in eval mode, on an all-ones input of the data's shape. Only that shape is taken from
    `batches`, so the scores do not depend on the data. It runs on a float64 copy: in
    float32 R overflows on deep networks such as ResNet-50, and working on a copy leaves
    the caller's model (signs included) exactly as it was."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in itertools.chain(net.parameters(), net.buffers()):
            if t.is_floating_point():
                t.abs_()
    names, weights = _weights(net)
    x = torch.ones(synflow_input_shape(batches), dtype=torch.float64, device=weights[0].device)
    r = net(x).sum()
    grads = _grad(r, weights)
    return {name: (g * w).detach().abs() for name, g, w in zip(names, grads, weights)}


@torch.no_grad()
def connected(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether some path leads from the input to the output through kept weights only.

    Pruning can cut every such path while leaving each layer some weights (SNIP at
    extreme ratios: the kept weights of consecutive layers do not line up), and can empty
    a layer without cutting them (a projection shortcut of a ResNet, bypassed by the
    residual path). This is SynFlow's R of the mask: a float64 copy where each output
    averages its kept inputs (weight mask / kept count, so nothing overflows or
    underflows), biases are zero and BatchNorm is the identity, fed all ones. Every term
    is non-negative, so the output is positive exactly when a path exists."""
    net = copy.deepcopy(model).double().eval()
    for m in net.modules():
        if isinstance(m, masking.PRUNABLE):
            keep = m.prune_mask.to(torch.float64) if hasattr(m, masking.MASK) else torch.ones_like(m.weight)
            per_output = keep.flatten(1).sum(1).clamp(min=1).view(-1, *[1] * (keep.dim() - 1))
            m.weight.copy_(keep / per_output)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()  # weight 1, bias 0, running mean 0, running variance 1
    x = torch.ones(input_shape, dtype=torch.float64, device=next(net.parameters()).device)
    return bool(net(x).sum() > 0)


# The registry of named choices: name -> scoring function.
PRUNERS = {
    "rand": random_scores,
    "mag": magnitude_scores,
    "snip": snip_scores,
    "grasp": grasp_scores,
    "synflow": synflow_scores,
}
config.check_registry("pruners", PRUNERS)
SCOPES = config.SCOPES
SCHEDULES = config.SCHEDULES
PRUNE_MODES = config.PRUNE_MODES  # eval: BatchNorm running statistics; train: each batch's


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
    layers that still have room."""
    if k > sum(caps):
        raise ValueError(f"cannot keep {k} weights: only {sum(caps)} survive")
    total = sum(sizes)
    exact = [s * k / total for s in sizes]
    quota = [min(math.floor(e), c) for e, c in zip(exact, caps)]
    left = k - sum(quota)
    # One more for the largest remainders, as in Hamilton's apportionment.
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True):
        if left == 0:
            break
        if quota[i] < caps[i] and quota[i] < exact[i]:
            quota[i] += 1
            left -= 1
    # What capped layers could not take, spread evenly over the layers with room.
    while left:
        room = [i for i in range(len(sizes)) if quota[i] < caps[i]]
        share = max(1, left // len(room))
        for i in room:
            add = min(share, caps[i] - quota[i], left)
            quota[i] += add
            left -= add
            if left == 0:
                break
    return quota


def masks_from_scores(scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], k: int,
                      scope: str) -> dict[str, torch.Tensor]:
    """Keep exactly k weights among those alive, ranked globally or within each layer."""
    names = list(scores)
    if scope == "global":
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        # Weights pruned in an earlier round can never come back.
        flat.masked_fill_(~torch.cat([alive[n].reshape(-1) for n in names]), -math.inf)
        keep = keep_top(flat, k)
        out, offset = {}, 0
        for n in names:
            size = scores[n].numel()
            out[n] = keep[offset:offset + size].view_as(scores[n])
            offset += size
        return out
    if scope == "local":
        quotas = layer_quotas([scores[n].numel() for n in names], k, [int(alive[n].sum()) for n in names])
        return {n: keep_top(scores[n].masked_fill(~alive[n], -math.inf), q) for n, q in zip(names, quotas)}
    raise ValueError(f"unknown scope {scope!r}; choose one of: {', '.join(SCOPES)}")


def shuffle_within_layers(masks: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Ablation: a random permutation of each layer's mask (same density, new positions)."""
    out = {}
    for n, m in masks.items():
        perm = torch.randperm(m.numel(), generator=generator).to(m.device)
        out[n] = m.reshape(-1)[perm].view_as(m)
    return out


def reinitialize(model: nn.Module, seed: int) -> None:
    """Ablation: draw fresh weights (the model's own initialization, seeded) and keep
    the masks, so the pruned weights are zero again."""
    torch.manual_seed(seed)
    if hasattr(model, "reset_parameters"):
        model.reset_parameters()
    else:
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    masking.apply_masks(model)


# ---------------------------------------------------------------------------- the engine

@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor]
    rounds: int
    # Per layer: mean score and sum of the kept weights' scores, from the last round
    # (the pruner's own scores, before any inversion).
    score_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    collapsed: list[str] = field(default_factory=list)  # layers with no surviving weight
    # Layers left with fewer weights than outputs: some outputs are cut off from every input.
    near_collapse: list[str] = field(default_factory=list)
    # Whether a path from input to output through kept weights remains (None: not checked).
    connected: bool | None = None


def prune(model: nn.Module, pruner: str, compression: float, batches: Batches | None = None,
          scope: str = "global", iterations: int = 0, schedule: str = "exponential",
          invert: bool = False, shuffle: bool = False, seed: int = 0, mode: str = "eval",
          progress: Callable[[int], None] | None = None) -> PruneResult:
    """Score and mask `model` in place so that round(total / compression) prunable
    weights survive. Returns the masks, also installed as each layer's `prune_mask`.

    Scoring runs in eval mode by default for every pruner (BatchNorm uses its running
    statistics, as in the Synaptic-Flow reference code; `mode="train"` uses each batch's
    statistics, as the original SNIP and GraSP code did), with gradients cleared before and after
    each round; afterwards the weights, buffers (BatchNorm statistics) and training
    mode are restored, and the pruned weights zeroed. Each round keeps
    round(total * density) weights, the density falling on `schedule` to 1/compression.
    """
    if pruner not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r}; choose one of: {', '.join(PRUNERS)}")
    if not compression >= 1:
        raise ValueError(f"compression must be >= 1 (prunable weights before / after), got {compression}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0 (0: the pruner's default), got {iterations}")
    score_fn = PRUNERS[pruner]
    rounds = iterations or config.default_iterations(pruner)
    generator = torch.Generator().manual_seed(seed)
    masking.add_masks(model)
    layers = masking.prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    target = round(total / compression)

    was_training = model.training
    # Everything, masks included, so that a failure part-way leaves the model as it was.
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if mode not in PRUNE_MODES:
        raise ValueError(f"unknown prune mode {mode!r}; choose one of: {', '.join(PRUNE_MODES)}")
    # BatchNorm's running statistics (eval) or each pruning batch's own (train); the saved
    # state puts the running statistics back either way.
    model.train(mode == "train")
    try:
        for r in range(1, rounds + 1):
            k = target if r == rounds else round(total * density_at(r, rounds, compression, schedule))
            model.zero_grad(set_to_none=True)
            with training.exact_fp32():
                scores = {n: s.detach() for n, s in score_fn(model, batches, generator).items()}
            model.zero_grad(set_to_none=True)
            alive = masking.get_masks(model)
            _check_finite(scores, alive, pruner)
            ranked = {n: -s for n, s in scores.items()} if invert else scores
            masks = masks_from_scores(ranked, alive, k, scope)
            masking.set_masks(model, masks)
            if progress:
                progress(r)
    finally:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if shuffle:
        masks = shuffle_within_layers(masks, generator)
    masking.set_masks(model, masks)

    summary = {n: {"mean": float(scores[n].double().mean()),
                   "kept_sum": float(scores[n].double()[masks[n]].sum())} for n in masks}
    collapsed = [n for n, m in masks.items() if not m.any()]
    near = [n for n, m in masks.items() if m.any() and int(m.sum()) < m.shape[0]]
    # The input's shape comes from the data; without batches the check is not made.
    linked = connected(model, synflow_input_shape(batches)) if batches else None
    if collapsed:
        warnings.warn(collapse_message(collapsed, bool(linked)), RuntimeWarning, stacklevel=2)
    elif linked is False:
        warnings.warn(DISCONNECTED, RuntimeWarning, stacklevel=2)
    return PruneResult(masks, rounds, summary, collapsed, near, linked)


DISCONNECTED = ("disconnected: no path leads from the input to the output through the kept weights, so the "
                "output does not depend on the input")


def collapse_message(collapsed: list[str], linked: bool = False) -> str:
    return (f"layer collapse: no weight survives in {len(collapsed)} layer(s) ({', '.join(collapsed)}); "
            + ("the network can no longer pass signal through them" if not linked else
               "other paths (residual connections) still link the input to the output"))


def _check_finite(scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor], pruner: str) -> None:
    """A NaN or inf score would make the ranking meaningless; fail loudly instead."""
    for n, s in scores.items():
        if s.shape != alive[n].shape:
            raise ValueError(f"pruner {pruner!r} gave scores of shape {tuple(s.shape)} for {n}, "
                             f"whose weight has shape {tuple(alive[n].shape)}")
        if not torch.isfinite(s[alive[n]]).all():
            raise FloatingPointError(f"pruner {pruner!r} produced NaN or infinite scores in layer {n}")
