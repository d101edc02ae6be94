"""The pruning engine and the five pruners: what each paper defines, exact survivor
counts, the ablations, and a model left as it was found apart from its mask."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from prunetrack import masking, models, pruning

RATIOS = (1, 2, 5, 10, 15, 20)


def tiny_net(bias: bool = True) -> nn.Module:
    """Conv, max-pool, ReLU and Linear layers: small enough for exact Hessian products."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 8, bias=bias), nn.ReLU(), nn.Linear(8, 5, bias=bias))


def tiny_batches(n: int = 12, classes: int = 5, split: int = 5, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.arange(n) % classes
    return [(x[i:i + split], y[i:i + split]) for i in range(0, n, split)]


def cifar_batches(n: int = 10, seed: int = 0):
    """One example of each of 10 classes, CIFAR-shaped."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % 10)]


def weights_of(model):
    return {n: m.weight for n, m in masking.prunable_layers(model).items()}


def full_loss(model, batches, temperature=1.0):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return F.cross_entropy(model(x) / temperature, y)


# ---------------------------------------------------------------------------- the papers' definitions

def test_snip_is_abs_gradient_times_weight():
    model = masking.add_masks(tiny_net().double()).eval()
    batches = tiny_batches(dtype=torch.float64)  # three batches: the loss is over all of them
    w = weights_of(model)
    grads = torch.autograd.grad(full_loss(model, batches), list(w.values()))
    scores = pruning.snip_scores(model, batches, torch.Generator())
    assert list(scores) == list(w)
    for (name, weight), g in zip(w.items(), grads):
        torch.testing.assert_close(scores[name], (g * weight).abs().detach(), rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())


def test_grasp_is_weight_times_hessian_gradient_product():
    """Our GraSP score is w * (Hg) with H and g of the loss at temperature 200, and we keep
    the highest. The original code scores -w * (Hg) and removes the highest: same masks."""
    model = masking.add_masks(tiny_net().double()).eval()
    batches = tiny_batches(dtype=torch.float64)
    w = weights_of(model)
    names = list(w)

    def loss_of(*weights):
        params = {f"{n}.weight": t for n, t in zip(names, weights)}
        return full_loss(lambda x: functional_call(model, params, (x,)), batches, pruning.GRASP_TEMPERATURE)

    primals = tuple(t.detach() for t in w.values())
    g = torch.autograd.functional.jacobian(loss_of, primals)
    _, hg = torch.autograd.functional.hvp(loss_of, primals, tuple(g))
    scores = pruning.grasp_scores(model, batches, torch.Generator())
    for name, weight, h in zip(names, primals, hg):
        expected = weight * h
        assert expected.abs().max() > 0  # a Hessian that is not trivially zero
        torch.testing.assert_close(scores[name], expected, rtol=1e-7, atol=1e-12 * float(expected.abs().max()))

    # The documented convention: the masks equal the original rule "remove the weights
    # with the highest -w * Hg".
    total = sum(t.numel() for t in primals)
    result = pruning.prune(model, "grasp", 4, batches)
    original = torch.cat([(-wt * h).reshape(-1) for wt, h in zip(primals, hg)])
    removed = torch.topk(original, total - round(total / 4)).indices
    expected_keep = torch.ones(total, dtype=torch.bool)
    expected_keep[removed] = False
    got = torch.cat([result.masks[n].reshape(-1) for n in names])
    assert torch.equal(got, expected_keep)


def test_synflow_conserves_flow_across_layers():
    """Tanaka et al. Theorem 2: in a bias-free ReLU network, the SynFlow scores of every
    layer sum to the same value R (conv, max-pool and linear layers alike)."""
    model = masking.add_masks(nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 5, 3, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 3, bias=False)))
    batches = tiny_batches(n=4, classes=3, split=4)
    sums = [float(s.sum()) for s in pruning.synflow_scores(model, batches, torch.Generator()).values()]
    assert len(sums) == 4
    for s in sums[1:]:
        assert s == pytest.approx(sums[0], rel=1e-12)


def test_synflow_scores_are_float64_and_leave_the_model_untouched():
    model = masking.add_masks(tiny_net())
    before = copy.deepcopy(model.state_dict())
    scores = pruning.synflow_scores(model, tiny_batches(), torch.Generator())
    assert all(s.dtype == torch.float64 for s in scores.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # signs included
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())


def test_synflow_masks_do_not_depend_on_the_data():
    model = tiny_net()
    masks = []
    for batches in (tiny_batches(seed=0), tiny_batches(n=3, split=3, seed=1), [(torch.zeros(1, 3, 8, 8), None)]):
        m = copy.deepcopy(model)
        masks.append(pruning.prune(m, "synflow", 20, batches, iterations=4).masks)
    for other in masks[1:]:
        assert all(torch.equal(masks[0][n], other[n]) for n in masks[0])


def test_synflow_resnet50_scores_are_finite():
    _, scores = scored("resnet50", "synflow")
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    assert flat.dtype == torch.float64
    assert torch.isfinite(flat).all() and flat.max() > 0
    # In float32 the same flow overflows: the reason for float64.
    assert float(flat.max()) > torch.finfo(torch.float32).max


def test_data_pruners_need_data():
    for name in ("snip", "grasp"):
        with pytest.raises(ValueError, match=f"{name}.*pruning batches"):
            pruning.prune(tiny_net(), name, 2, batches=None)


# ---------------------------------------------------------------------------- exact survivor counts

# Score sets shaped like layers, for the rule that turns scores into masks on its own.
SCORE_CASES = ("ties", "all-equal", "one-layer", "many-layers")
# The study's ratios, and others whose survivor count is not a round number.
SURVIVOR_RATIOS = (*RATIOS, 1.5, 3, 7, 100, 1000)


def synthetic_scores(case: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (16, 8, 3, 3), (10, 144), (5, 10)]
    if case == "ties":  # four distinct values: the threshold always falls inside a tie
        return {f"layer{i}": torch.randint(0, 4, s, generator=g).float() for i, s in enumerate(shapes)}
    if case == "all-equal":
        return {f"layer{i}": torch.ones(s) for i, s in enumerate(shapes)}
    if case == "one-layer":
        return {"only": torch.randn(37, 11, generator=g)}
    if case == "many-layers":  # 40 layers of 1 to 2,000 weights, mixed signs, a fifth exactly zero
        sizes = [1, 2, 3, *torch.randint(4, 2000, (37,), generator=g).tolist()]
        return {f"layer{i}": torch.randn(n, generator=g) * (torch.rand(n, generator=g) > 0.2)
                for i, n in enumerate(sizes)}
    raise ValueError(case)


def assert_keeps_the_highest(scores, alive, masks, scope):
    """Only alive weights survive, and no dropped alive weight outscores a kept one
    (across all layers for the global scope, within each layer for the local one)."""
    assert all(not (masks[n] & ~alive[n]).any() for n in scores)
    groups = [list(scores)] if scope == "global" else [[n] for n in scores]
    for names in groups:
        kept = torch.cat([scores[n][masks[n]] for n in names])
        dropped = torch.cat([scores[n][alive[n] & ~masks[n]] for n in names])
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max(), names


@pytest.mark.parametrize("scope", pruning.SCOPES)
@pytest.mark.parametrize("case", SCORE_CASES)
def test_exact_survivor_count(case, scope):
    """round(total / compression) survivors at every ratio, ties included."""
    scores = synthetic_scores(case)
    alive = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    for ratio in SURVIVOR_RATIOS:
        k = round(total / ratio)
        masks = pruning.masks_from_scores(scores, alive, k, scope)
        kept = {n: int(m.sum()) for n, m in masks.items()}
        assert sum(kept.values()) == k, ratio
        if scope == "local":  # every layer at the same density, up to rounding
            for n, s in scores.items():
                assert abs(kept[n] - s.numel() * k / total) < 1, (ratio, n)
        assert_keeps_the_highest(scores, alive, masks, scope)


@pytest.mark.parametrize("scope", pruning.SCOPES)
@pytest.mark.parametrize("case", SCORE_CASES)
def test_exact_survivor_count_after_an_earlier_round(case, scope):
    """In a later round only the weights still alive compete: exactly k survive, none of
    them pruned before (some layers have fewer alive weights than their share)."""
    scores = synthetic_scores(case)
    g = torch.Generator().manual_seed(1)
    alive = {n: torch.rand(s.shape, generator=g) < 0.6 for n, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    left = sum(int(a.sum()) for a in alive.values())
    for ratio in SURVIVOR_RATIOS:
        k = round(total / ratio)
        if k > left:
            continue
        masks = pruning.masks_from_scores(scores, alive, k, scope)
        assert sum(int(m.sum()) for m in masks.values()) == k, ratio
        assert_keeps_the_highest(scores, alive, masks, scope)


_SCORES: dict[tuple[str, str], tuple[nn.Module, dict]] = {}


def scored(model_name: str, pruner: str):
    """Scores computed once per (model, pruner) on the pristine model, 10 examples."""
    key = (model_name, pruner)
    if key not in _SCORES:
        torch.manual_seed(0)
        model = masking.add_masks(models.get_model(model_name)).eval()
        scores = pruning.PRUNERS[pruner](model, cifar_batches(), torch.Generator().manual_seed(0))
        _SCORES[key] = (model, {n: s.detach() for n, s in scores.items()})
    return _SCORES[key]


@pytest.mark.parametrize("scope", pruning.SCOPES)
def test_exact_survivor_count_on_a_real_model(scope, monkeypatch):
    """The same on VGG16's SynFlow scores (spread over many orders of magnitude), and
    through the whole engine (`prune`, the scores replayed) at 10x for 3 rounds, so that
    its schedule and the rule that pruned weights stay pruned are exercised too."""
    model, scores = scored("vgg16", "synflow")
    alive = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    for ratio in RATIOS:
        masks = pruning.masks_from_scores(scores, alive, round(total / ratio), scope)
        kept = {n: int(m.sum()) for n, m in masks.items()}
        assert sum(kept.values()) == round(total / ratio), ratio
        if scope == "local":
            for n, s in scores.items():
                assert abs(kept[n] - s.numel() / ratio) <= 1, (ratio, n)

    model = copy.deepcopy(model)
    monkeypatch.setitem(pruning.PRUNERS, "synflow", lambda *_: scores)
    result = pruning.prune(model, "synflow", 10, cifar_batches(), scope=scope, iterations=3)
    assert sum(int(m.sum()) for m in result.masks.values()) == round(total / 10)
    assert masking.count(model) == (total, round(total / 10))


@pytest.mark.parametrize("scope", pruning.SCOPES)
def test_ties_never_change_the_count(scope, monkeypatch):
    model = masking.add_masks(tiny_net())
    monkeypatch.setitem(pruning.PRUNERS, "rand", lambda m, b, g: {n: torch.ones_like(w) for n, w in weights_of(m).items()})
    total = sum(w.numel() for w in weights_of(model).values())
    for ratio in (1, 1.5, 3, 7, 100):
        result = pruning.prune(copy.deepcopy(model), "rand", ratio, scope=scope, iterations=2)
        assert sum(int(m.sum()) for m in result.masks.values()) == round(total / ratio)


def test_non_finite_scores_are_an_error(monkeypatch):
    def bad(model, batches, generator):
        scores = {n: torch.ones_like(w) for n, w in weights_of(model).items()}
        next(iter(scores.values()))[0] = math.nan
        return scores

    monkeypatch.setitem(pruning.PRUNERS, "rand", bad)
    with pytest.raises(FloatingPointError, match="NaN"):
        pruning.prune(tiny_net(), "rand", 2)


# ---------------------------------------------------------------------------- independent implementations

def reference_global_masks(scores: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Keep the `keep` highest scores across all layers, by a full sort."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    out, i = [], 0
    for s in scores:
        out.append(mask[i:i + s.numel()].view_as(s))
        i += s.numel()
    return out


def reference_synflow(model: nn.Module, compression: float, rounds: int) -> list[torch.Tensor]:
    """SynFlow as in the paper's Algorithm 1, written out directly: linearize the signed
    state in place, iterate score / mask on an exponential schedule, restore the signs."""
    model = copy.deepcopy(model).double().eval()
    weights = [m.weight for m in masking.prunable_layers(model).values()]
    signs = {k: torch.sign(v) for k, v in model.state_dict().items() if v.is_floating_point()}
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.abs_()
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    original = [w.detach().clone() for w in weights]
    total = sum(w.numel() for w in weights)
    for r in range(1, rounds + 1):
        with torch.no_grad():
            for w, o, m in zip(weights, original, masks):
                w.copy_(o * m)
        out = model(torch.ones(1, 3, 32, 32, dtype=torch.float64)).sum()
        grads = torch.autograd.grad(out, weights)
        scores = [torch.where(m, (g * w).abs(), torch.tensor(-1.0, dtype=torch.float64))
                  for g, w, m in zip(grads, weights, masks)]
        masks = reference_global_masks(scores, round(total * compression ** (-r / rounds)))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in signs:
                v.mul_(signs[k])
    return masks


def reference_grasp(model: nn.Module, batches, compression: float) -> list[torch.Tensor]:
    """GraSP as its reference code does it: each batch halved, g summed over the halves,
    Hg by backpropagating g . grad, then remove the highest -w * Hg."""
    model = copy.deepcopy(model)
    weights = [m.weight for m in masking.prunable_layers(model).values()]
    halves = [(x[s], y[s]) for x, y in batches for s in (slice(0, len(y) // 2), slice(len(y) // 2, None))]
    g = [torch.zeros_like(w) for w in weights]
    for x, y in halves:
        for acc, d in zip(g, torch.autograd.grad(F.cross_entropy(model(x) / 200, y), weights)):
            acc += d
    for p in model.parameters():
        p.grad = None
    for x, y in halves:
        grads = torch.autograd.grad(F.cross_entropy(model(x) / 200, y), weights, create_graph=True)
        sum((a * b).sum() for a, b in zip(g, grads)).backward()
    scores = torch.cat([(-w.detach() * w.grad).reshape(-1) for w in weights])
    scores = scores / (scores.sum().abs() + 1e-10)
    remove = len(scores) - round(len(scores) / compression)
    threshold = torch.topk(scores, remove, sorted=True).values[-1]
    out, i = [], 0
    for w in weights:
        out.append(scores[i:i + w.numel()].view_as(w) < threshold)
        i += w.numel()
    return out


@pytest.fixture
def resnet20():
    torch.manual_seed(3)
    return models.get_model("resnet20")


def test_snip_and_magnitude_agree_with_a_direct_sort(resnet20):
    batches = cifar_batches(n=20)
    model = copy.deepcopy(resnet20).eval()
    weights = list(weights_of(model).values())
    grads = torch.autograd.grad(full_loss(model, batches), weights)
    total = sum(w.numel() for w in weights)
    for pruner, scores in (("snip", [(g * w).abs().detach() for g, w in zip(grads, weights)]),
                           ("mag", [w.detach().abs() for w in weights])):
        expected = reference_global_masks(scores, round(total / 10))
        got = pruning.prune(copy.deepcopy(resnet20), pruner, 10, batches).masks
        assert all(torch.equal(a, b) for a, b in zip(got.values(), expected)), pruner


def assert_same_masks(got: dict[str, torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for (name, a), b in zip(got.items(), expected):
        assert torch.equal(a, b), (name, int(a.sum()), int(b.sum()), int((a != b).sum()))


def test_grasp_agrees_with_the_reference_procedure(resnet20):
    """The reference splits the data differently and scales the scores (by 4 and by their
    sum), which changes no ranking; in float64 the different summation orders cannot
    flip a weight at the threshold either, so the masks are the same, weight for weight."""
    model = resnet20.double().eval()
    batches = [(x.double(), y) for x, y in cifar_batches(n=20)]
    expected = reference_grasp(model, batches, 10)
    got = pruning.prune(copy.deepcopy(model), "grasp", 10, batches).masks
    assert_same_masks(got, expected)


def test_synflow_agrees_with_the_reference_algorithm(resnet20):
    expected = reference_synflow(resnet20, 50, rounds=10)
    got = pruning.prune(copy.deepcopy(resnet20), "synflow", 50, iterations=10).masks
    assert_same_masks(got, expected)


# ---------------------------------------------------------------------------- the engine's promises

@pytest.mark.parametrize("pruner", list(pruning.PRUNERS))
def test_scoring_leaves_the_model_untouched(pruner):
    torch.manual_seed(0)
    model = masking.add_masks(models.get_model("resnet20"))
    model.train()
    with torch.no_grad():  # BatchNorm statistics that differ from their initial values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    before = copy.deepcopy(model.state_dict())
    result = pruning.prune(model, pruner, 5, cifar_batches(), iterations=2)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    layers = masking.prunable_layers(model)
    for k, v in model.state_dict().items():
        if masking.is_mask_key(k):
            continue
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and layer in layers:  # survivors unchanged, the rest zero
            mask = result.masks[layer]
            assert torch.equal(v[mask], before[k][mask]) and not v[~mask].any(), k
        else:
            assert torch.equal(v, before[k]), k


def test_a_failing_round_leaves_the_model_as_it_was(monkeypatch):
    model = masking.add_masks(tiny_net())
    before = copy.deepcopy(model.state_dict())
    calls = []

    def fails_in_round_two(m, b, g):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return pruning.magnitude_scores(m, b, g)

    monkeypatch.setitem(pruning.PRUNERS, "mag", fails_in_round_two)
    with pytest.raises(RuntimeError, match="out of memory"):
        pruning.prune(model, "mag", 10, iterations=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # masks too
    assert model.training


def test_schedules():
    assert pruning.density_at(1, 2, 100, "exponential") == pytest.approx(0.1)
    assert pruning.density_at(2, 2, 100, "exponential") == pytest.approx(0.01)
    assert pruning.density_at(1, 2, 10, "linear") == pytest.approx(0.55)
    assert pruning.density_at(4, 4, 10, "linear") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule 'cosine'.*exponential, linear"):
        pruning.density_at(1, 2, 10, "cosine")


@pytest.mark.parametrize("schedule", pruning.SCHEDULES)
def test_iterative_rounds_follow_the_schedule(schedule, monkeypatch):
    model = masking.add_masks(tiny_net())
    total = sum(w.numel() for w in weights_of(model).values())
    seen = []

    def mag_recording(m, b, g):
        seen.append(masking.count(m)[1])
        return pruning.magnitude_scores(m, b, g)

    monkeypatch.setitem(pruning.PRUNERS, "mag", mag_recording)
    result = pruning.prune(model, "mag", 8, iterations=3, schedule=schedule)
    expected = [total] + [round(total * pruning.density_at(r, 3, 8, schedule)) for r in (1, 2)]
    assert seen == expected and result.rounds == 3
    assert masking.count(model)[1] == round(total / 8)


def test_pruned_weights_stay_pruned():
    model = masking.add_masks(tiny_net())
    first = {n: m.clone() for n, m in pruning.prune(model, "rand", 2, seed=0).masks.items()}
    second = pruning.prune(model, "rand", 4, seed=1).masks
    assert all(not (second[n] & ~first[n]).any() for n in first)


def test_same_seed_same_masks():
    torch.manual_seed(0)
    model = models.get_model("resnet20")
    a = pruning.prune(copy.deepcopy(model), "rand", 10, seed=5, shuffle=True).masks
    b = pruning.prune(copy.deepcopy(model), "rand", 10, seed=5, shuffle=True).masks
    c = pruning.prune(copy.deepcopy(model), "rand", 10, seed=6, shuffle=True).masks
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    batches = cifar_batches()
    s1 = pruning.prune(copy.deepcopy(model), "snip", 10, batches).masks
    s2 = pruning.prune(copy.deepcopy(model), "snip", 10, batches).masks
    assert all(torch.equal(s1[n], s2[n]) for n in s1)


def test_shuffle_permutes_each_layer():
    torch.manual_seed(0)
    model = models.get_model("resnet20")
    plain = pruning.prune(copy.deepcopy(model), "mag", 10, seed=0).masks
    shuffled = pruning.prune(copy.deepcopy(model), "mag", 10, seed=0, shuffle=True).masks
    for n in plain:
        assert int(shuffled[n].sum()) == int(plain[n].sum()), n  # each layer's density kept
        if 0 < int(plain[n].sum()) < plain[n].numel() - 1:
            assert not torch.equal(shuffled[n], plain[n]), n  # and the positions really moved


def test_invert_keeps_the_lowest_scores():
    model = masking.add_masks(tiny_net())
    magnitudes = torch.cat([w.detach().abs().reshape(-1) for w in weights_of(model).values()])
    masks = pruning.prune(model, "mag", 4, invert=True).masks
    kept = torch.cat([m.reshape(-1) for m in masks.values()])
    assert int(kept.sum()) == round(len(kept) / 4)
    assert magnitudes[kept].max() <= magnitudes[~kept].min()


def test_reinitialize_keeps_masks_and_draws_new_weights():
    torch.manual_seed(0)
    model = models.get_model("resnet20")
    masks = {n: m.clone() for n, m in pruning.prune(model, "mag", 10).masks.items()}
    before = {n: w.detach().clone() for n, w in weights_of(model).items()}
    pruning.reinitialize(model, seed=1)
    after = {n: w.detach().clone() for n, w in weights_of(model).items()}
    assert all(torch.equal(masking.get_masks(model)[n], masks[n]) for n in masks)
    for n, w in after.items():
        assert not w[~masks[n]].any(), n
        if masks[n].sum() > 1:
            assert not torch.equal(w[masks[n]], before[n][masks[n]]), n
    again = copy.deepcopy(model)
    pruning.reinitialize(again, seed=1)
    assert all(torch.equal(w, after[n]) for n, w in weights_of(again).items())  # seeded


def test_score_summary_per_layer():
    model = masking.add_masks(tiny_net())
    magnitudes = {n: w.detach().abs().clone() for n, w in weights_of(model).items()}
    result = pruning.prune(model, "mag", 3)
    for n, magnitude in magnitudes.items():
        assert result.score_summary[n]["kept_sum"] == pytest.approx(float(magnitude[result.masks[n]].sum()))
        assert result.score_summary[n]["mean"] == pytest.approx(float(magnitude.mean()))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown pruner 'obd'.*synflow"):
        pruning.prune(tiny_net(), "obd", 2)
    with pytest.raises(ValueError, match="compression must be >= 1"):
        pruning.prune(tiny_net(), "mag", 0.5)
    with pytest.raises(ValueError, match="iterations must be >= 0"):
        pruning.prune(tiny_net(), "mag", 2, iterations=-1)
    with pytest.raises(ValueError, match="unknown scope 'layer'"):
        pruning.prune(tiny_net(), "mag", 2, scope="layer")


# ---------------------------------------------------------------------------- layer collapse

def narrow_net() -> nn.Module:
    """A wide input layer with small weights (fan-in 256) feeding a 2-unit bottleneck.
    Bias-free, so that no signal reaches the output around a collapsed layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 16, bias=False), nn.ReLU(), nn.Linear(16, 2, bias=False),
                         nn.ReLU(), nn.Linear(2, 10, bias=False))


def test_layer_collapse_is_reported():
    model = narrow_net()
    with pytest.warns(RuntimeWarning, match=r"layer collapse: no weight survives in \d layer\(s\) \(1, "):
        result = pruning.prune(model, "mag", 500)
    assert result.collapsed[0] == "1"  # the small-weight input layer goes first
    for name in result.collapsed:
        assert not result.masks[name].any() and not dict(model.named_modules())[name].weight.any()
    assert [n for n, m in result.masks.items() if not m.any()] == result.collapsed
    # SynFlow is designed to avoid exactly this (Tanaka et al.): no layer collapses.
    result = pruning.prune(narrow_net(), "synflow", 500, [(torch.ones(1, 256), torch.zeros(1))], iterations=20)
    assert result.collapsed == [] and all(m.any() for m in result.masks.values())


def test_disconnection_is_found_even_when_every_layer_keeps_weights():
    """SNIP at extreme ratios: each layer keeps weights, but those of consecutive layers do
    not line up, so no input reaches the output."""
    model = masking.add_masks(narrow_net())
    masks = {n: torch.zeros_like(m) for n, m in masking.get_masks(model).items()}
    masks["1"][0, :] = True   # hidden unit 0 sees the input ...
    masks["3"][1, 5] = True   # ... but the bottleneck only reads hidden unit 5
    masks["5"][:, 1] = True
    masking.set_masks(model, masks)
    assert all(m.any() for m in masks.values())
    assert not pruning.connected(model, (1, 256))
    masks["3"][1, 0] = True   # now unit 0 -> bottleneck 1 -> output: one path
    masking.set_masks(model, masks)
    assert pruning.connected(model, (1, 256))


def test_an_emptied_projection_shortcut_leaves_a_resnet_connected():
    """Layer collapse inside a residual block is not disconnection: the residual path
    still links input and output. An empty classifier is both."""
    model = masking.add_masks(models.get_model("resnet20"))
    masks = masking.get_masks(model)
    shortcut = next(n for n in masks if "shortcut" in n)
    masks[shortcut] = torch.zeros_like(masks[shortcut])
    masking.set_masks(model, masks)
    assert pruning.connected(model, (1, 3, 32, 32))
    last = list(masks)[-1]
    masks[last] = torch.zeros_like(masks[last])
    masking.set_masks(model, masks)
    assert not pruning.connected(model, (1, 3, 32, 32))


def test_layer_collapse_is_a_warning_of_the_run(mlflow_store, capsys):
    import mlflow
    from conftest import SMOKE

    from prunetrack.config import JobConfig
    from prunetrack.job import run_job

    cfg = JobConfig.from_flat({**SMOKE, "pruner": "mag", "compression": 1e5, "train_subset": 128,
                               "test_subset": 64})
    run_id = run_job(cfg)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    collapsed = run.data.tags["layer_collapse"].split(",")
    assert collapsed and set(collapsed) <= set(masking.prunable_layers(models.get_model("resnet20")))
    assert run.data.tags["warning"].startswith("layer collapse")
    assert run.data.tags["disconnected"] == "true"  # 3 weights left: no input reaches the output
    assert "WARNING: layer collapse" in capsys.readouterr().err


def test_train_mode_scoring_uses_batch_statistics_and_restores_the_running_ones():
    """--prune-mode train scores with each batch's BatchNorm statistics (as the original SNIP
    code did): other masks than eval mode on a BatchNorm network, same survivor count, and
    the running statistics and training flag are left as they were."""
    torch.manual_seed(0)
    model = masking.add_masks(models.get_model("resnet20"))
    with torch.no_grad():  # running statistics far from a batch's own, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    batches = [(torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,)))]
    model.eval()
    masks = {mode: pruning.prune(copy.deepcopy(model), "snip", 10, batches, mode=mode).masks
             for mode in ("eval", "train")}
    kept = {mode: sum(int(m.sum()) for m in ms.values()) for mode, ms in masks.items()}
    assert kept["eval"] == kept["train"]
    assert any(not torch.equal(masks["eval"][k], masks["train"][k]) for k in masks["eval"])
    pruning.prune(model, "snip", 10, batches, mode="train")
    assert not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    with pytest.raises(ValueError, match="unknown prune mode 'test'"):
        pruning.prune(model, "snip", 10, batches, mode="test")


def test_near_collapse_is_flagged(mlflow_store, capsys):
    """A layer left with fewer weights than outputs cuts some outputs off from every input:
    not empty, so not `layer_collapse`, but tagged and warned about."""
    import mlflow
    from conftest import SMOKE

    from prunetrack.config import JobConfig
    from prunetrack.job import run_job

    torch.manual_seed(0)
    result = pruning.prune(models.get_model("resnet20"), "rand", 500)
    assert result.near_collapse and not set(result.near_collapse) & set(result.collapsed)
    for name in result.near_collapse:
        mask = result.masks[name]
        assert 0 < int(mask.sum()) < mask.shape[0]
    run = mlflow.get_run(run_job(JobConfig.from_flat({**SMOKE, "pruner": "rand", "compression": 500,
                                                      "train_subset": 128, "test_subset": 64})))
    assert set(run.data.tags["near_collapse"].split(",")) >= {"conv1"}
    assert "WARNING: near layer collapse" in capsys.readouterr().err
