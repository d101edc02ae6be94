"""Honest cost up front: how long the cells of a sweep will take on this machine.

The rates of each distinct (model, batch sizes, precision, device) come from the runs that
already trained it on this kind of device, when the experiment has some: the median of
their epochs' times. Otherwise a short probe times a few real training steps, one
evaluation batch and one pruning round on random data of the dataset's shape; where the
runs timed the training but not every pruner, only the other pruners' rounds are probed. (A probe
taken while a sweep trains shares the cores with it, and overstates the time several-fold;
the runs' own epochs do not.) A cell's estimate is its remaining epochs at those rates plus
its pruning. Printed by `prunetrack sweep SPEC --dry-run`.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch

from prunetrack import masking, measure, models, pruning, tracking, training
from prunetrack.config import JobConfig, resolved_iterations
from prunetrack.progress import plural

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
    device, model, batch, classes = _probe_model(cfg)
    t = cfg.train
    opt, _ = training.make_optimizer(t.optimizer, model, t.lr, t.weight_decay, [], 0.1)
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
    return Rates(t.batch_size / train, t.test_batch_size / test, probe_rounds(cfg, pruners, (device, model, batch, classes)))


def probe_rounds(cfg: JobConfig, pruners: set[str], built: tuple | None = None) -> dict[str, float]:
    """Seconds of one scoring round of each of `pruners` on `cfg`'s model and pruning batch
    size: all a sweep needs to probe when earlier runs timed its training but not these pruners."""
    device, model, batch, classes = built or _probe_model(cfg)
    pb = [batch(min(cfg.prune.prune_batch_size, cfg.prune.prune_per_class * classes))]
    rounds = {}
    for name in sorted(pruners):
        if name not in pruning.PRUNERS:
            continue
        rounds[name] = measure.time_repeats(lambda name=name: pruning.prune(model, name, 2.0, pb, iterations=1),
                                            repeats=1, warmup=0, device=device).median
        masking.set_masks(model, {k: torch.ones_like(m) for k, m in masking.get_masks(model).items()})
    return rounds


def _probe_model(cfg: JobConfig):
    """The device, `cfg`'s model with masks as a job prepares it, a maker of random batches
    of the dataset's shape, and its number of classes."""
    from prunetrack.job import resolve_device

    device = resolve_device(cfg.run.device)
    classes = 100 if cfg.data.dataset == "cifar100" else 10
    model = training.prepare(masking.add_masks(models.get_model(cfg.model.model, classes)).to(device))

    def batch(n):
        x = torch.randn(n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, classes, (n,), device=device)

    return device, model, batch, classes


def measured(cfg: JobConfig, records: list[dict], device: str, precision: str) -> tuple[Rates, str] | None:
    """The rates that earlier runs of `cfg`'s training measured on `device` (its description,
    as the runs' `device` tag gives it) in `precision`, from tracking.speed_records, and a
    line saying where they come from; None when no run matches. Pruners that no run used
    are missing from prune_round."""
    t, d = cfg.train, cfg.data
    want_tags = {"model": cfg.model.model, "dataset": d.dataset, "device": device, "precision": precision}
    want_params = {"batch_size": t.batch_size, "test_batch_size": t.test_batch_size, "optimizer": t.optimizer,
                   "train_subset": d.train_subset, "test_subset": d.test_subset}
    runs = [r for r in records if all(r["tags"].get(k) == str(v) for k, v in want_tags.items())
            and all(r["params"].get(k) == str(v) for k, v in want_params.items())]
    n_train, n_test = (min(n, subset or 10**9) for n, subset in
                       zip(SIZES.get(d.dataset, (50_000, 10_000)), (d.train_subset, d.test_subset)))
    # The test rate: the timing after training, of the runs that finished; else each epoch's evaluation.
    tested = [r["metrics"]["test_images_per_sec"] for r in runs if "test_images_per_sec" in r["metrics"]]
    tested = tested or [n_test / e for r in runs for e in r.get("eval_times", []) if e > 0]
    if not tested:
        return None
    epochs = [s for r in runs for s in r["epoch_times"]]
    rounds: dict[str, list[float]] = {}
    for r in runs:
        iterations = r["params"].get("iterations_resolved") or r["params"].get("iterations")
        scored = r["tags"].get("pruner") and r["tags"].get("dense") != "true"  # at 1x nothing is scored
        if "pruning_time" in r["metrics"] and scored and iterations and int(iterations) > 0:
            rounds.setdefault(r["tags"]["pruner"], []).append(r["metrics"]["pruning_time"] / int(iterations))
    rates = Rates(n_train / statistics.median(epochs), statistics.median(tested),
                  {p: statistics.median(v) for p, v in rounds.items()})
    finished = sum(r.get("status", "FINISHED") == "FINISHED" for r in runs)
    which = (plural(len(runs), "finished run") if finished == len(runs) else
             f"{plural(len(runs), 'run')} ({finished} finished)")
    return rates, f"the median of {plural(len(epochs), 'epoch')} of {which} on this kind of device"


def earlier_epoch(cfg: JobConfig, experiment: str) -> float | None:
    """Seconds an epoch of `cfg`'s training, with its evaluation, took in the FINISHED runs of
    `experiment` that trained it on this kind of device in this precision (`measured`); None
    without such runs. What a job under a time limit expects of its first epoch."""
    rates = Estimator(tracking.speed_records(experiment), set(), probe=False).rates_for(cfg)
    return None if rates is None else epoch_seconds(cfg, rates)


def probe_key(cfg: JobConfig) -> tuple:
    t = cfg.train
    return (cfg.model.model, cfg.data.dataset, t.batch_size, t.test_batch_size, t.precision, t.optimizer,
            cfg.run.device, cfg.prune.prune_batch_size, cfg.prune.prune_per_class)


def epoch_seconds(cfg: JobConfig, rates: Rates) -> float:
    n_train, n_test = SIZES.get(cfg.data.dataset, (50_000, 10_000))
    n_train = min(n_train, cfg.data.train_subset or n_train)
    n_test = min(n_test, cfg.data.test_subset or n_test)
    return n_train / rates.train + n_test / rates.test


def seconds(cfg: JobConfig, rates: Rates, kind: str = "prune", done_epochs: int = 0,
            pre_epochs: int | None = None) -> float:
    """Estimated seconds left for a cell (or a pre-training, of `pre_epochs` epochs, by
    default its maximum) that has finished `done_epochs` epochs."""
    per_epoch = epoch_seconds(cfg, rates)
    if kind == "pretrain":
        return per_epoch * max((pre_epochs or cfg.train.pre_epochs) - done_epochs, 0)
    prune_time = 0.0 if done_epochs or cfg.dense() else \
        rates.prune_round.get(cfg.prune.pruner, 0.0) * resolved_iterations(cfg)
    # The final measurements evaluate the test set timing_repeats + 1 times.
    n_test = min(SIZES.get(cfg.data.dataset, (0, 10_000))[1], cfg.data.test_subset or 10**9)
    timing = (cfg.run.timing_repeats + 1) * n_test / rates.test
    return prune_time + per_epoch * max(cfg.train.post_epochs - done_epochs, 0) + timing


def next_save(cfg: JobConfig, rates: Rates, kind: str = "prune", done_epochs: int = 0) -> float:
    """Seconds until a cell with `done_epochs` epochs saved saves its next epoch: its
    pruning first, when it has not pruned yet, then one epoch."""
    prune = kind == "prune" and not done_epochs and not cfg.dense()
    return epoch_seconds(cfg, rates) + (rates.prune_round.get(cfg.prune.pruner, 0.0) * resolved_iterations(cfg)
                                        if prune else 0.0)


def epochs_within(cfg: JobConfig, rates: Rates, available: float, kind: str = "prune", done_epochs: int = 0,
                  pre_epochs: int | None = None) -> int:
    """The epoch a cell with `done_epochs` saved will have saved `available` seconds from now:
    where a time limit stops it. As the job decides (training.fit): its pruning comes first,
    an epoch starts only if it ends in time, and the last epoch only if the final test
    passes end in time too (a pre-training has none)."""
    total = (pre_epochs or cfg.train.pre_epochs) if kind == "pretrain" else cfg.train.post_epochs
    per_epoch = epoch_seconds(cfg, rates)
    first = next_save(cfg, rates, kind, done_epochs)  # the pruning, if still to do, and one epoch
    if done_epochs >= total or available < first:
        return min(done_epochs, total)
    reached = min(done_epochs + 1 + int((available - first) // per_epoch), total)
    if reached == total and kind == "prune" and available < seconds(cfg, rates, kind, done_epochs):
        reached -= 1  # the final test passes would end after the limit: the last epoch is not started
    return reached


def busy_machine() -> str:
    """How busy this machine is, when other work runs (the load average over the last
    minute at half its cores or more): a probe taken now shares the cores, and overstates
    the time, several-fold where a training holds them all. "" when it is quiet (or the
    platform has no load average)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return ""
    cores = os.cpu_count() or 1
    if load < cores / 2:
        return ""
    return f"while the machine was busy (load average {load:.2f} on {plural(cores, 'core')}): overstated"


class Estimator:
    """Each cell's time left on this machine: its epochs to go at the rates of earlier runs
    of the same training (`records`, from tracking.speed_records) or, with `probe`, of a
    short probe where there are none; `left` is None for a cell it cannot estimate."""

    def __init__(self, records: list[dict], pruners: set[str], probe: bool = True, echo=print):
        self.records, self.pruners, self.probe, self.echo = records, pruners, probe, echo
        self.rates: dict[tuple, tuple[Rates, str] | None] = {}

    def refresh(self, records: list[dict]) -> None:
        """Estimate from `records` from now on (the runs finished since, included)."""
        self.records, self.rates = records, {}

    def rates_for(self, cfg: JobConfig) -> Rates | None:
        from prunetrack.job import device_name, resolve_device

        key = probe_key(cfg)
        if key not in self.rates:
            device = resolve_device(cfg.run.device)
            found = measured(cfg, self.records, device_name(device), training.resolve_precision(cfg.train.precision, device))
            if self.probe and found is None:
                self.echo(f"  (probing {cfg.model.model} on {cfg.run.device}, batch {cfg.train.batch_size}, "
                          f"{cfg.train.precision} ...)")
                busy = busy_machine()
                found = probe(cfg, self.pruners), "a probe of 2 steps" + (f", {busy}" if busy else "")
            elif self.probe and not self.pruners <= found[0].prune_round.keys():
                # The runs' rates; a probe only of the rounds of the pruners no run here used.
                missing = self.pruners - found[0].prune_round.keys()
                self.echo(f"  (probing a pruning round of {', '.join(sorted(missing))} on {cfg.model.model} ...)")
                busy = busy_machine()
                found[0].prune_round = {**probe_rounds(cfg, missing), **found[0].prune_round}
                if busy:
                    found = found[0], f"{found[1]}; pruning rounds of {', '.join(sorted(missing))} probed {busy}"
            self.rates[key] = found
        return self.rates[key][0] if self.rates[key] else None

    def left(self, cfg: JobConfig, kind: str, done_epochs: int) -> float | None:
        rates = self.rates_for(cfg)
        if rates is None:
            return None
        return seconds(cfg, rates, kind, done_epochs, self.pretrain_epochs(cfg) if kind == "pretrain" else None)

    def next_save(self, cfg: JobConfig, kind: str, done_epochs: int) -> float | None:
        """`next_save` at this machine's rates (None: no estimate)."""
        rates = self.rates_for(cfg)
        return None if rates is None else next_save(cfg, rates, kind, done_epochs)

    def epochs_within(self, cfg: JobConfig, kind: str, done_epochs: int, available: float) -> int | None:
        """`epochs_within` at this machine's rates (None: no estimate)."""
        rates = self.rates_for(cfg)
        return None if rates is None else epochs_within(
            cfg, rates, available, kind, done_epochs, self.pretrain_epochs(cfg) if kind == "pretrain" else None)

    def pretrain_epochs(self, cfg: JobConfig) -> int | None:
        """How many epochs a pre-training that stops on patience will take: as many as the
        earlier pre-trainings of the same model and stopping rule took (their median); None
        (its maximum) without such runs, or without patience."""
        t = cfg.train
        if not t.pre_patience:
            return None
        ran = [len(r["epoch_times"]) for r in self.records if r["tags"].get(tracking.KIND_TAG) == "pretrain"
               and r.get("status", "FINISHED") == "FINISHED"  # a pre-training not ended has not stopped yet
               and r["tags"].get("model") == cfg.model.model and r["tags"].get("dataset") == cfg.data.dataset
               and r["params"].get("pre_epochs") == str(t.pre_epochs)
               and r["params"].get("pre_patience") == str(t.pre_patience)]
        return min(int(statistics.median(ran)), t.pre_epochs) if ran else None

    def sources(self) -> list[str]:
        """A line per rate used: where it comes from, and its values."""
        out = []
        for key, found in self.rates.items():
            if found:
                r, source = found
                rounds = ", ".join(f"{p} {s:.2f}s" for p, s in sorted(r.prune_round.items()))
                out.append(f"rates of {key[0]} batch {key[2]} {key[4]} ({source}): train {r.train:.0f} img/s, "
                           f"test {r.test:.0f} img/s; one pruning round: {rounds}")
        return out

