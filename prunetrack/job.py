"""One pruning job, start to finish: build, (pre-train), prune, train, measure, log.

Read this file top to bottom to follow a job from the command line to the MLflow run.
"""
from __future__ import annotations

import platform
import random
import sys
import time

import mlflow
import numpy as np
import torch

from prunetrack import __version__, data, masking, measure, models, pruning, tracking, training
from prunetrack.config import JobConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve(cfg: JobConfig) -> JobConfig:
    """Fill the fields whose default depends on other fields (in place)."""
    cfg.prune.iterations = cfg.prune.iterations or pruning.DEFAULT_ITERATIONS.get(cfg.prune.pruner, 1)
    return cfg


def run_job(cfg: JobConfig) -> str:
    """Run one job; returns the MLflow run id. Raises on bad configuration before any
    run is created, and on any later failure after closing the run as FAILED."""
    cfg.validate()
    device = resolve_device(cfg.run.device)
    resolve(cfg)
    p, t = cfg.prune, cfg.train
    name = cfg.run.run_name or f"{cfg.model.model}-{p.pruner}-{p.compression:g}x-s{cfg.run.seed}"

    with tracking.job_run(cfg.run.experiment, name, tags={"config_hash": cfg.config_hash()}) as run:
        tracking.log_config(cfg.flat())
        tracking.log_tags({
            "model": cfg.model.model, "dataset": cfg.data.dataset, "pruner": p.pruner,
            "compression": f"{p.compression:g}", "seed": cfg.run.seed, "git_commit": tracking.git_commit(),
            "device": device_name(device), "device_type": device.type, "prunetrack_version": __version__,
            "torch_version": torch.__version__, "mlflow_version": mlflow.__version__,
        })
        print(f"run {run.info.run_id}: {name} on {device_name(device)}", flush=True)

        # 1. Model and data, seeded.
        seed_everything(cfg.run.seed)
        ds = data.load(cfg.data.dataset, cfg.data.data_dir, cfg.data.download, cfg.data.train_subset,
                       cfg.data.test_subset, cfg.run.seed).to(device)
        tracking.log_tags({"dataset_sha256": ds.sha256, "dataset_source": data.source(ds),
                           "train_examples": len(ds.train_y),
                           "test_examples": len(ds.test_y)})
        model = masking.add_masks(models.get_model(cfg.model.model, ds.num_classes)).to(device)
        # Channels-last activations and weights: cuDNN's fastest (tensor-core) convolutions
        # on CUDA, and oneDNN's on CPU (BENCHMARKS.md: VGG16 trains 5-10% faster on CPU).
        model = model.to(memory_format=torch.channels_last)
        # The network that trains and evaluates: compiled if asked. It shares its
        # parameters and masks with `model`, which the pruners score uncompiled.
        net = torch.compile(model) if t.compile else model
        stream = torch.Generator(device=device).manual_seed(cfg.run.seed)
        train_batches = data.Batches(ds.train_x, ds.train_y, t.batch_size, ds.mean, ds.std, train=True,
                                     generator=stream, channels_last=True)
        test_batches = data.Batches(ds.test_x, ds.test_y, t.test_batch_size, ds.mean, ds.std,
                                    channels_last=True)

        def optimizer():  # a fresh optimizer and schedule for each training phase
            return training.make_optimizer(t.optimizer, model, t.lr, t.weight_decay, t.lr_drop_epochs(),
                                           t.lr_drop_rate)

        # 2. Optional pre-training (logged as pre_* metrics).
        start = time.perf_counter()
        if t.pre_epochs:
            training.fit(net, train_batches, test_batches, t.pre_epochs, *optimizer(), label="pre-train",
                         precision=t.precision,
                         on_epoch=lambda e, m: tracking.log_metrics({f"pre_{k}": v for k, v in m.items()}, e))
        pre_time = time.perf_counter() - start

        # 3. Prune.
        prune_batches = data.pruning_batches(ds, p.prune_per_class, p.prune_batch_size, cfg.run.seed)
        # Timed once, between device synchronizations, by the same helper as the testing time.
        timed = measure.time_repeats(
            lambda: pruning.prune(model, p.pruner, p.compression, prune_batches, scope=p.scope,
                                  iterations=p.iterations, schedule=p.schedule, invert=p.invert,
                                  shuffle=p.shuffle, seed=cfg.run.seed),
            repeats=1, warmup=0, device=device)
        result, pruning_time = timed.result, timed.median
        if p.reinit:  # ablation: same masks, fresh weights
            pruning.reinitialize(model, cfg.run.seed + 1)
        prunable, remaining = masking.count(model)
        print(f"pruned with {p.pruner} in {pruning_time:.2f}s: {remaining}/{prunable} prunable weights kept "
              f"(density {remaining / prunable:.4f})", flush=True)
        if result.collapsed:  # a known failure mode: visible in the run, not only in a log
            warning = pruning.collapse_message(result.collapsed)
            tracking.log_tags({"layer_collapse": ",".join(result.collapsed), "warning": warning})
            print(f"WARNING: {warning}", file=sys.stderr, flush=True)
        tracking.log_dict(result.score_summary, "score_summary.json")
        tracking.log_masks(result.masks)
        init_weights = measure.surviving_weights(model)  # what training starts from, for the histograms

        # 4. Train the pruned network with a fresh optimizer and schedule.
        start = time.perf_counter()
        training.fit(net, train_batches, test_batches, t.post_epochs, *optimizer(), precision=t.precision,
                     on_epoch=lambda e, m: tracking.log_metrics(m, e))
        training_time = time.perf_counter() - start

        # 5. Final measurements: accuracy, testing time, FLOPs, parameters, per-layer table, histograms.
        # The warm-up evaluation gives the accuracy; the timed repeats give test_time.
        timing = measure.time_repeats(lambda: training.evaluate(net, test_batches, t.precision),
                                      repeats=cfg.run.timing_repeats, warmup=1, device=device)
        final = timing.result
        flops = measure.count_flops(model, torch.zeros(1, *ds.test_x.shape[1:], device=device))
        layer_density = measure.densities(model)
        flops_effective = flops.effective_total(layer_density)
        total_params = sum(q.numel() for q in model.parameters())
        tracking.log_metrics({
            # test_top5 and test_loss keep their last per-epoch values (same model, same data).
            "test_accuracy": final["top1"],
            "test_time": timing.median, "test_images_per_sec": len(ds.test_y) / timing.median,
            "test_time_batch_size": t.test_batch_size,
            "flops_dense": flops.total, "flops_effective": flops_effective,
            "macs_dense": flops.total / 2, "macs_effective": flops_effective / 2,
            "theoretical_speedup": flops.total / max(flops_effective, 1.0),
            "params_total": total_params, "params_prunable": prunable,
            "params_remaining": remaining, "density": remaining / prunable,
            "compression_actual": prunable / max(remaining, 1), "pruning_time": pruning_time,
            "pretraining_time": pre_time, "training_time": training_time,
        })
        rows = measure.layer_rows(model, flops)
        tracking.log_table(rows, "layers")
        histograms = measure.histogram_record(init_weights, measure.surviving_weights(model), layer_density)
        tracking.log_dict(histograms, "histograms.json")
        tracking.log_figure(measure.histogram_figure(histograms, f"{name}: surviving weights"),
                            "weight_histograms.png")
        tracking.log_figure(measure.density_figure(rows, f"{name}: density per layer"), "layer_density.png")
        print(f"test time {timing.median:.3f}s (median of {len(timing.times)}), "
              f"{flops_effective / 1e9:.4g} of {flops.total / 1e9:.4g} GFLOPs per image", flush=True)
        print(f"done: test top-1 {final['top1']:.2f}%, run {run.info.run_id}", flush=True)
        return run.info.run_id

