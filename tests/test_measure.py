"""Measurements: FLOPs against torchinfo and known values, effective FLOPs under pruning,
exact histogram counts, the timing helper, and what a job logs."""
from __future__ import annotations

import json
import os
import struct

import mlflow
import pytest
import torch
import torchinfo
from torch import nn

from prunetrack import masking, measure, models, pruning
from prunetrack.config import JobConfig
from prunetrack.job import run_job
from tests.conftest import SMOKE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name, low, high", [
    # Published CIFAR numbers: VGG16 (one 512->10 classifier) about 0.31 G MACs,
    # ResNet-50 with a 3x3 stride-1 stem about 1.3 G MACs at 32x32.
    ("vgg16", 0.310e9, 0.316e9),
    ("resnet50", 1.29e9, 1.31e9),
])
def test_dense_macs_match_known_values_and_torchinfo(name, low, high):
    model = masking.add_masks(models.get_model(name))
    flops = measure.count_flops(model, torch.zeros(1, 3, 32, 32))
    macs = flops.total / 2
    assert low < macs < high
    # torchinfo also prices biases and BatchNorm, which the counter leaves out: under 0.1% here.
    reference = torchinfo.summary(model, input_size=(1, 3, 32, 32), verbose=0).total_mult_adds
    assert macs == pytest.approx(reference, rel=1e-3)
    assert macs <= reference
    # Every FLOP of these models is in a prunable layer.
    assert flops.other == 0
    assert sum(flops.layers.values()) == flops.total


def test_flops_are_two_per_multiply_accumulate():
    # Conv2d(3 -> 8, 3x3, padding 1) on 4x4: 8 * 3 * 9 multiply-accumulates at each of 16 positions.
    conv = masking.add_masks(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 5)))
    flops = measure.count_flops(conv, torch.zeros(1, 3, 4, 4))
    assert flops.layers == {"0": 2 * 8 * 3 * 9 * 16, "2": 2 * 8 * 16 * 5}
    assert flops.total == 2 * (8 * 3 * 9 * 16 + 8 * 16 * 5)


def test_count_flops_leaves_the_model_as_it_was():
    model = masking.add_masks(models.get_model("resnet20")).train()
    stats = model.bn1.running_mean.clone()
    measure.count_flops(model, torch.randn(1, 3, 32, 32))
    assert model.training
    assert torch.equal(model.bn1.running_mean, stats)
    with pytest.raises(ValueError, match="batch dimension of 1"):
        measure.count_flops(model, torch.zeros(2, 3, 32, 32))


def test_effective_flops_at_10x_follow_layer_densities():
    torch.manual_seed(0)
    model = masking.add_masks(models.get_model("resnet20"))
    # Magnitude pruning, global scope: densities differ from layer to layer.
    pruning.prune(model, "mag", 10.0, scope="global")
    flops = measure.count_flops(model, torch.zeros(1, 3, 32, 32))
    masks = masking.get_masks(model)
    layer_density = measure.densities(model)
    assert layer_density == {n: m.sum().item() / m.numel() for n, m in masks.items()}
    assert len(set(round(d, 3) for d in layer_density.values())) > 1

    expected = flops.other + sum(flops.layers[n] * m.sum().item() / m.numel() for n, m in masks.items())
    effective = flops.effective_total(layer_density)
    assert effective == pytest.approx(expected, rel=1e-12)
    assert effective < flops.total
    # Not exactly 10x (conv layers differ in FLOPs per weight), but of that order.
    assert 3 < flops.total / effective < 30

    rows = measure.layer_rows(model, flops)
    assert [r["layer"] for r in rows] == list(masks)
    assert set(rows[0]) == {"layer", "type", "shape", "params", "remaining", "density", "flops_dense",
                            "flops_effective"}
    assert {r["type"] for r in rows} == {"Conv2d", "Linear"}
    assert sum(r["remaining"] for r in rows) == masking.count(model)[1]
    assert sum(r["flops_effective"] for r in rows) + flops.other == pytest.approx(effective)
    fc = next(r for r in rows if r["layer"] == "fc")
    assert fc["shape"] == "10x64" and fc["params"] == 640


def test_histograms_count_exactly_the_surviving_weights():
    torch.manual_seed(0)
    model = masking.add_masks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 3)))
    conv_mask = torch.rand(4, 3, 3, 3) < 0.3
    linear_mask = torch.zeros(3, 4, dtype=torch.bool)  # a collapsed layer: nothing survives
    masking.set_masks(model, {"0": conv_mask, "2": linear_mask})
    init = measure.surviving_weights(model)
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # "training" changes the survivors...
        model[0].weight[~conv_mask] = 100.0  # ...and a pruned entry that is not zero must still not count
    final = measure.surviving_weights(model)
    record = measure.histogram_record(init, final, measure.densities(model), bins=10)

    assert record["bins"] == 10
    conv = record["layers"]["0"]
    assert conv["density"] == conv_mask.sum().item() / conv_mask.numel()
    for stage in ("init", "final"):
        assert sum(conv[stage]["counts"]) == conv_mask.sum().item()
        assert len(conv[stage]["counts"]) == 10 and len(conv[stage]["edges"]) == 11
    # Both stages share the edges, which span exactly the surviving values (100.0 excluded).
    survivors = torch.cat([init["0"], final["0"]])
    assert conv["init"]["edges"] == conv["final"]["edges"]
    assert conv["final"]["edges"][0] == pytest.approx(survivors.min().item())
    assert conv["final"]["edges"][-1] == pytest.approx(survivors.max().item())
    linear = record["layers"]["2"]
    assert linear["density"] == 0 and sum(linear["init"]["counts"]) == sum(linear["final"]["counts"]) == 0
    json.dumps(record)  # plain numbers, ready for histograms.json


class _Events:
    """Records the order of calls the timing helper makes; its clock advances by a
    scripted duration for each call of the timed function."""

    def __init__(self, durations):
        self.log, self.now, self.durations, self.calls = [], 0.0, list(durations), 0

    def fn(self):
        self.log.append("run")
        self.now += self.durations.pop(0)
        self.calls += 1
        return self.calls  # which call this was

    def sync(self, device=None):
        self.log.append("sync")

    def clock(self):
        self.log.append("clock")
        return self.now


def test_timing_synchronizes_around_each_repeat_and_returns_the_median(monkeypatch):
    events = _Events([50.0, 3.0, 1.0, 2.0])  # a slow warm-up, then three repeats
    monkeypatch.setattr(torch.cuda, "synchronize", events.sync)
    timing = measure.time_repeats(events.fn, repeats=3, warmup=1, device="cuda", clock=events.clock)
    assert timing.times == [3.0, 1.0, 2.0]
    assert timing.median == 2.0
    assert timing.result == 1  # the warm-up's result
    # Device work queued before the start and by the call is inside each measurement.
    assert events.log == ["run"] + ["sync", "clock", "run", "sync", "clock"] * 3


def test_timing_on_cpu_needs_no_synchronization(monkeypatch):
    def fail(*args):
        raise AssertionError("synchronized a CPU device")

    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    events = _Events([1.0, 4.0])
    timing = measure.time_repeats(events.fn, repeats=2, warmup=0, device=torch.device("cpu"), clock=events.clock)
    assert timing.times == [1.0, 4.0] and timing.median == 2.5
    assert timing.result == 1  # without warm-up, the first repeat's result
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure.time_repeats(events.fn, repeats=0)


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", f"{path} is not a PNG file"
    return struct.unpack(">II", head[16:24])


def test_job_logs_measurements(mlflow_store):
    run_id = run_job(JobConfig.from_flat({**SMOKE, "compression": 10.0, "timing_repeats": 2}))
    run = mlflow.get_run(run_id)
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert m["flops_dense"] == 2 * m["macs_dense"] and m["flops_effective"] == 2 * m["macs_effective"]
    assert m["flops_effective"] < m["flops_dense"]
    assert m["theoretical_speedup"] == pytest.approx(m["flops_dense"] / m["flops_effective"])
    assert m["test_time"] > 0 and m["test_time_batch_size"] == SMOKE["test_batch_size"]
    assert m["test_images_per_sec"] == pytest.approx(int(run.data.tags["test_examples"]) / m["test_time"])
    assert m["params_prunable"] < m["params_total"]
    assert m["compression_actual"] == pytest.approx(10, rel=0.01)
    assert run.data.params["timing_repeats"] == "2"

    artifacts = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="")
    with open(os.path.join(artifacts, "layers.json")) as fh:
        table = json.load(fh)
    assert table["columns"] == ["layer", "type", "shape", "params", "remaining", "density", "flops_dense",
                                "flops_effective"]
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert sum(r["remaining"] for r in rows) == m["params_remaining"]
    assert sum(r["flops_dense"] for r in rows) == m["flops_dense"]  # nothing outside prunable layers here
    assert sum(r["flops_effective"] for r in rows) == pytest.approx(m["flops_effective"])

    with open(os.path.join(artifacts, "histograms.json")) as fh:
        hist = json.load(fh)
    assert list(hist["layers"]) == [r["layer"] for r in rows]
    for r in rows:
        layer = hist["layers"][r["layer"]]
        assert layer["density"] == pytest.approx(r["density"])
        assert sum(layer["init"]["counts"]) == sum(layer["final"]["counts"]) == r["remaining"]

    for name in ("weight_histograms.png", "layer_density.png"):
        width, height = _png_size(os.path.join(artifacts, name))
        assert width >= 600 and height >= 300, (name, width, height)
