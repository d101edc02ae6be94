"""A controlled timing pass: testing (inference) time that compares across cells.

A job's own `test_time` is measured while whatever else runs on the machine competes
with it (on a 2-core CPU, identical work varied 4.6-7.3 s). This pass rebuilds each
finished run's network from its logged masks, then times a full test-set evaluation of
every network in rounds, the order rotated each round, so that slow drift (thermal,
other load) hits every cell alike. Each run gets the median and the spread, and the
conditions (threads, device, batch size, precision, load average) as tags.

Weights are a fresh initialization under the run's masks: with dense kernels the time
does not depend on the weights' values, only on the shapes, which the masks keep. For
the same reason a run without its masks (an export carries none, so imported runs lack
them) is timed under masks with exactly its logged number of surviving weights in each
layer (layers.json), placed at random; its `timing.masks` tag says which it was.

Each network is evaluated in the precision its run trained in, unless `precision` names
one for all: a study whose cells trained in different precisions, or one timed on a
machine that only emulates bf16, compares best with one arithmetic for every cell.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import mlflow
import torch

from prunetrack import data, masking, measure, models, store, tracking, training
from prunetrack.config import TIMING_PRECISIONS
from prunetrack.progress import plural


@dataclass
class Timed:
    run_id: str
    name: str
    net: torch.nn.Module
    batches: data.Batches  # the test split
    precision: str
    masks: str = "logged"  # or "layer counts" (masks_of)
    times: list[float] = field(default_factory=list)


def finished_prune_runs(experiment: str, models_: list[str] | None = None) -> list:
    """The FINISHED prune runs of `experiment` (not pre-training or report runs)."""
    exp = store.find_experiment(experiment)
    runs = mlflow.MlflowClient().search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                             max_results=5000, order_by=["attributes.start_time ASC"])
    out = [r for r in runs if tracking.KIND_TAG not in r.data.tags and "pruner" in r.data.tags]
    return [r for r in out if not models_ or r.data.tags.get("model") in models_]


def masks_of(run, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor] | None, str]:
    """`run`'s masks for `model` and where they came from: `logged` (its masks.pt);
    `layer counts` (no masks.pt: as many surviving weights in each layer as its
    layers.json logs, at seeded random places); or (None, why) when it has neither."""
    client = mlflow.MlflowClient()
    present = {a.path for a in client.list_artifacts(run.info.run_id)}
    if "masks.pt" in present:
        return masking.load_masks(f"runs:/{run.info.run_id}"), "logged"
    if "layers.json" not in present:
        return None, "it has neither masks.pt nor layers.json"
    with tempfile.TemporaryDirectory() as d, open(client.download_artifacts(run.info.run_id, "layers.json", d)) as f:
        table = json.load(f)
    remaining = {row[table["columns"].index("layer")]: int(row[table["columns"].index("remaining")])
                 for row in table["data"]}
    try:
        return masking.masks_with_counts(model, remaining), "layer counts"
    except ValueError:  # the counts name other layers than the model's
        return None, "its layers.json does not list this model's prunable layers"


QUIET_LOAD = 0.5  # per CPU: the 1-minute load average below which the machine counts as idle


def settle(limit_s: float, echo: Callable[[str], None] = print, poll_s: float = 5.0) -> float:
    """Wait up to `limit_s` for the 1-minute load average to fall below QUIET_LOAD per CPU
    and return it. A job that just stopped (a sweep's training) leaves the average high for
    a minute or two after the CPUs are free: it decays by e every 60 s."""
    quiet = QUIET_LOAD * (os.cpu_count() or 1)
    load, deadline = os.getloadavg()[0], time.monotonic() + limit_s
    if load > quiet and limit_s > 0:
        echo(f"load average {load:.2f}: waiting up to {limit_s:.0f} s for it to fall below {quiet:.2f}")
    while load > quiet and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))
        load = os.getloadavg()[0]
    return load


def time_runs(experiment: str, rounds: int = 5, batch_size: int = 256, device: str = "auto",
              data_dir: str = "", models_: list[str] | None = None,
              echo: Callable[[str], None] = print, untimed: bool = False,
              precision: str = "trained", settle_s: float = 0) -> list[Timed]:
    """Time every finished prune run of `experiment` (with `untimed`, only those without a
    timed_test_time yet) and log the results to each run. `precision`: "trained" (each
    run's own), or one of config.PRECISIONS for every run ("auto": what this device
    computes natively). `settle_s`: how long to wait first for the machine to be idle."""
    from prunetrack.job import device_name, resolve_device

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if precision not in TIMING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TIMING_PRECISIONS)}, got {precision!r}")
    dev = resolve_device(device)
    training.use_device(dev)  # the arithmetic the jobs evaluated in
    runs = finished_prune_runs(experiment, models_)
    if not runs:
        raise store.TrackingError(f"experiment {experiment!r} has no FINISHED prune runs to time")
    if untimed:
        runs = [r for r in runs if "timed_test_time" not in r.data.metrics]
        if not runs:
            echo(f"every FINISHED prune run of {experiment!r} has a timed_test_time already; nothing to time")
            return []
    load = settle(settle_s, echo)
    if load > QUIET_LOAD * (os.cpu_count() or 1):
        echo(f"WARNING: load average {load:.2f} on {os.cpu_count()} CPUs: something else is running, and the "
             f"times will show it (the load is logged with them)")

    # The test split of each dataset, loaded once, on the device.
    splits: dict[tuple, tuple[data.Batches, int]] = {}
    timed: list[Timed] = []
    for r in runs:
        p, tags = r.data.params, r.data.tags
        key = (p.get("dataset", "cifar10"), data_dir or p.get("data_dir", "data"), int(p.get("test_subset", 0) or 0))
        if key not in splits:
            ds = data.load(key[0], key[1], download=False, test_subset=key[2]).to(dev)
            splits[key] = (data.Batches(ds.test_x, ds.test_y, batch_size, ds.mean, ds.std, channels_last=True),
                           ds.num_classes)
        batches, classes = splits[key]
        net = masking.add_masks(models.get_model(tags["model"], classes))
        masks, source = masks_of(r, net)
        if masks is None:
            echo(f"not timing {r.info.run_name} ({r.info.run_id[:8]}): {source}")
            continue
        masking.set_masks(net, masks)
        if precision == "trained":
            arithmetic = tags.get("precision") or training.resolve_precision(p.get("precision", "auto"), dev)
        else:
            arithmetic = training.resolve_precision(precision, dev)
        net = training.prepare(net.to(dev)).eval()
        timed.append(Timed(r.info.run_id, r.info.run_name, net, batches, arithmetic, source))
    if not timed:
        raise store.TrackingError(f"no run of {experiment!r} could be rebuilt for timing (see above)")
    rebuilt = [t for t in timed if t.masks == "layer counts"]
    if rebuilt:
        echo(f"{plural(len(rebuilt), 'run')} without masks (imported: exports carry none) timed under masks with "
             f"their logged number of surviving weights in each layer, placed at random: dense kernels take as "
             f"long whichever weights are zero")
    echo(f"timing {plural(len(timed), 'run')} of {experiment!r}: {plural(rounds, 'round')} of a full test-set evaluation each, "
         f"batch {batch_size}, on {device_name(dev)}")
    emulated = [t for t in timed if t.precision == "bf16" and not training.native_bf16(dev)]
    if emulated:
        echo(f"WARNING: {plural(len(emulated), 'run')} {'trained' if precision == 'trained' else 'timed'} in bf16, which {device_name(dev)} only emulates (several "
             "times slower than fp32): their times here are not those of a machine with native bf16, and the pass "
             "takes that much longer (--precision fp32 times every run in fp32)")

    sync = measure.device_sync(dev)
    for t in timed:  # warm-up: kernel choice and caches, once per network
        training.evaluate(t.net, t.batches, t.precision)
    start = time.perf_counter()
    for i in range(rounds):
        order = timed[i % len(timed):] + timed[:i % len(timed)]  # rotate: no cell always first
        for t in order:
            sync()
            t0 = time.perf_counter()
            training.evaluate(t.net, t.batches, t.precision)
            sync()
            t.times.append(time.perf_counter() - t0)
        done = time.perf_counter() - start
        echo(f"  round {i + 1}/{rounds} done ({done:.0f}s; ~{done / (i + 1) * (rounds - i - 1):.0f}s left)")

    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    conditions = {"timing.rounds": rounds, "timing.threads": torch.get_num_threads(),
                  "timing.device": device_name(dev), "timing.batch_size": batch_size,
                  "timing.loadavg": f"{load:.2f}", "timing.when": when}
    for t in timed:
        median = statistics.median(t.times)
        tracking.log_to_finished_run(t.run_id, {"timed_test_time": median, "timed_test_time_min": min(t.times),
                                                "timed_test_time_max": max(t.times)},
                                     {**conditions, "timing.precision": t.precision, "timing.masks": t.masks})
        echo(f"  {t.name:32s} median {median * 1e3:8.1f} ms  (min {min(t.times) * 1e3:.1f}, "
             f"max {max(t.times) * 1e3:.1f})")
    return timed
