"""Honest cost up front: how long the cells of a sweep will take on this machine.

A short probe times a few real training steps, one evaluation batch and one pruning
round of each distinct (model, batch sizes, precision, device) on random data of the
dataset's shape; a cell's estimate is its remaining epochs at those rates plus its
pruning. Printed by `prunetrack sweep SPEC --dry-run`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prunetrack import masking, measure, models, pruning, training
from prunetrack.config import JobConfig, resolved_iterations

# Training / test examples of each dataset (the probe does not load the data).
SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "synthetic": (1_000, 200)}


@dataclass
class Rates:
    train: float         # images per second, training (forward, backward, step)
    test: float          # images per second, evaluation
    prune_round: dict    # pruner -> seconds per scoring round


def probe(cfg: JobConfig, pruners: set[str], steps: int = 2) -> Rates:
    """Time `steps` training steps and evaluation batches of `cfg`'s model as jobs run them
    (channels-last, fused optimizer, the job's precision), and one scoring round of each
    pruner on the pruning batch size."""
    from prunetrack.job import resolve_device

    device = resolve_device(cfg.run.device)
    t = cfg.train
    classes = 100 if cfg.data.dataset == "cifar100" else 10
    model = training.prepare(masking.add_masks(models.get_model(cfg.model.model, classes)).to(device))
    opt, _ = training.make_optimizer(t.optimizer, model, t.lr, t.weight_decay, [], 0.1)

    def batch(n):
        x = torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, classes, (n,), device=device)

    x, y = batch(t.batch_size)
    model.train()
    # One warm-up (kernel choice, allocation), then `steps` timed between device syncs.
    train = measure.time_repeats(lambda: training.train_step(model, x, y, opt, t.precision, device),
                                 repeats=steps, warmup=1, device=device).median
    xt, _ = batch(t.test_batch_size)

    @torch.no_grad()
    def evaluate():
        model.eval()
        with training.autocast(t.precision, device):
            return float(model(xt).sum())

    test = measure.time_repeats(evaluate, repeats=steps, warmup=1, device=device).median
    rounds = {}
    pb = [batch(min(cfg.prune.prune_batch_size, cfg.prune.prune_per_class * classes))]
    for name in sorted(pruners):
        if name not in pruning.PRUNERS:
            continue
        rounds[name] = measure.time_repeats(lambda name=name: pruning.prune(model, name, 2.0, pb, iterations=1),
                                            repeats=1, warmup=0, device=device).median
        masking.set_masks(model, {k: torch.ones_like(m) for k, m in masking.get_masks(model).items()})
    return Rates(t.batch_size / train, t.test_batch_size / test, rounds)


def probe_key(cfg: JobConfig) -> tuple:
    t = cfg.train
    return (cfg.model.model, cfg.data.dataset, t.batch_size, t.test_batch_size, t.precision, t.optimizer,
            cfg.run.device, cfg.prune.prune_batch_size, cfg.prune.prune_per_class)


def epoch_seconds(cfg: JobConfig, rates: Rates) -> float:
    n_train, n_test = SIZES.get(cfg.data.dataset, (50_000, 10_000))
    n_train = min(n_train, cfg.data.train_subset or n_train)
    n_test = min(n_test, cfg.data.test_subset or n_test)
    return n_train / rates.train + n_test / rates.test


def seconds(cfg: JobConfig, rates: Rates, kind: str = "prune", done_epochs: int = 0) -> float:
    """Estimated seconds left for a cell (or a pre-training, at its maximum of pre_epochs)
    that has finished `done_epochs` epochs."""
    per_epoch = epoch_seconds(cfg, rates)
    if kind == "pretrain":
        return per_epoch * max(cfg.train.pre_epochs - done_epochs, 0)
    prune_time = 0.0 if done_epochs or cfg.dense() else \
        rates.prune_round.get(cfg.prune.pruner, 0.0) * resolved_iterations(cfg)
    # The final measurements evaluate the test set timing_repeats + 1 times.
    n_test = min(SIZES.get(cfg.data.dataset, (0, 10_000))[1], cfg.data.test_subset or 10**9)
    timing = (cfg.run.timing_repeats + 1) * n_test / rates.test
    return prune_time + per_epoch * max(cfg.train.post_epochs - done_epochs, 0) + timing
