"""Masks: pruned weights stay exactly zero through training, and masks travel intact
through files and MLflow runs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetrack import load_masks, masking, models, training


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


def random_masks(model, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(m.weight.shape, generator=g) < density for n, m in masking.prunable_layers(model).items()}


@pytest.mark.parametrize("optimizer", list(training.OPTIMIZERS))
def test_masked_weights_stay_zero_after_every_step(optimizer):
    model = small_net()
    masks = random_masks(model)
    masking.set_masks(model, masks)
    opt, _ = training.make_optimizer(optimizer, model, lr=0.05, weight_decay=5e-4, lr_drops=[], lr_drop_rate=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 4, 4, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(5)]
    before = {n: m.weight.detach().clone() for n, m in masking.prunable_layers(model).items()}
    steps = []

    def check(step, seen):  # called after each optimizer step and re-masking
        for n, m in masking.prunable_layers(model).items():
            assert not m.weight[~masks[n]].any(), (optimizer, step, n)
        steps.append(step)

    for _ in range(2):  # momentum and second moments build up across epochs
        training.train_epoch(model, batches, opt, progress=check)
    assert steps == [1, 2, 3, 4, 5] * 2
    for n, m in masking.prunable_layers(model).items():  # the survivors did train
        assert not torch.equal(m.weight[masks[n]], before[n][masks[n]]), n


def test_save_and_load_round_trip(tmp_path):
    model = small_net()
    masks = random_masks(model, density=0.5)
    path = tmp_path / "masks.pt"
    masking.save_masks(masks, str(path))
    loaded = load_masks(str(path))
    assert list(loaded) == list(masks)
    for n in masks:
        assert loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n])
    # One bit per weight (plus a small header): compact enough to log with every run.
    assert path.stat().st_size < sum(m.numel() for m in masks.values()) / 8 + 2000


def test_load_masks_from_a_run(mlflow_store):
    import mlflow

    from prunetrack import tracking

    masks = random_masks(small_net())
    mlflow.set_experiment("masks")  # in this test's fresh store, whatever an earlier test selected
    with mlflow.start_run() as run:
        tracking.log_masks(masks)
    loaded = load_masks(f"runs:/{run.info.run_id}")
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    model = small_net()
    masking.set_masks(model, loaded)
    assert masking.count(model)[1] == sum(int(m.sum()) for m in masks.values())


def test_not_a_masks_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(ValueError, match="not a prunetrack masks file"):
        load_masks(str(path))


def test_set_masks_rejects_wrong_shapes_and_layers():
    model = small_net()
    masks = random_masks(model)
    wrong = {**masks, "4": torch.ones(10, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"mask for 4 has shape \(10, 3\), weight has \(10, 128\)"):
        masking.set_masks(model, wrong)
    with pytest.raises(ValueError, match=r"missing \['4'\]"):
        masking.set_masks(model, {"0": masks["0"]})
    with pytest.raises(ValueError, match=r"unexpected \['fc'\]"):
        masking.set_masks(model, {**masks, "fc": masks["4"]})


def test_set_masks_zeroes_pruned_weights_and_count():
    model = small_net()
    masks = random_masks(model)
    masking.set_masks(model, masks)
    for n, m in masking.prunable_layers(model).items():
        assert not m.weight[~masks[n]].any() and m.weight[masks[n]].all()
    total = sum(m.numel() for m in masks.values())
    assert masking.count(model) == (total, sum(int(m.sum()) for m in masks.values()))


def test_torch_prune_works_on_a_masked_model():
    """The mask buffer does not take the name torch.nn.utils.prune uses (`weight_mask`),
    so torch's pruning applies to a masked layer as it is."""
    from torch.nn.utils import prune as tprune

    model = small_net()
    masks = random_masks(model)
    masking.set_masks(model, masks)
    for name, m in masking.prunable_layers(model).items():
        tprune.custom_from_mask(m, "weight", m.prune_mask)
        assert torch.equal(m.weight_mask.bool(), masks[name]) and torch.equal(m.prune_mask, masks[name])
        assert not m.weight[~masks[name]].any()
    assert masking.count(model)[1] == sum(int(m.sum()) for m in masks.values())


def test_masks_with_counts_keep_exactly_those_counts_and_refuse_other_layers():
    model = masking.add_masks(models.get_model("resnet20"))
    counts = {name: (7 * i) % (m.weight.numel() + 1) for i, (name, m) in enumerate(masking.prunable_layers(model).items())}
    masks = masking.masks_with_counts(model, counts, seed=3)
    assert {n: int(m.sum()) for n, m in masks.items()} == counts
    assert all(m.dtype == torch.bool for m in masks.values())
    again = masking.masks_with_counts(model, counts, seed=3)
    assert all(torch.equal(masks[n], again[n]) for n in masks)  # seeded
    with pytest.raises(ValueError, match="counts do not match the model's prunable layers: missing"):
        masking.masks_with_counts(model, dict(list(counts.items())[1:]))
