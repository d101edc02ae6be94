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

from prunetrack import __version__, data, masking, models, pruning, tracking, training
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


def run_job(cfg: JobConfig) -> str:
    """Run one job; returns the MLflow run id. Raises on bad configuration before any
    run is created, and on any later failure after closing the run as FAILED."""
    cfg.validate()
    device = resolve_device(cfg.run.device)
    cfg.prune.iterations = cfg.prune.iterations or pruning.DEFAULT_ITERATIONS.get(cfg.prune.pruner, 1)
    p, t = cfg.prune, cfg.train
    name = cfg.run.run_name or f"{cfg.model.model}-{p.pruner}-{p.compression:g}x-s{cfg.run.seed}"

    with tracking.job_run(cfg.run.experiment, name) as run:
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
        tracking.log_tags({"dataset_sha256": ds.sha256, "train_examples": len(ds.train_y),
                           "test_examples": len(ds.test_y)})
        model = masking.add_masks(models.get_model(cfg.model.model, ds.num_classes)).to(device)
        stream = torch.Generator(device=device).manual_seed(cfg.run.seed)
        train_batches = data.Batches(ds.train_x, ds.train_y, t.batch_size, ds.mean, ds.std, train=True,
                                     generator=stream)
        test_batches = data.Batches(ds.test_x, ds.test_y, t.test_batch_size, ds.mean, ds.std)

        def optimizer():  # a fresh optimizer and schedule for each training phase
            return training.make_optimizer(t.optimizer, model, t.lr, t.weight_decay, t.lr_drop_epochs(),
                                           t.lr_drop_rate)

        # 2. Optional pre-training (logged as pre_* metrics).
        start = time.perf_counter()
        if t.pre_epochs:
            training.fit(model, train_batches, test_batches, t.pre_epochs, *optimizer(), label="pre-train",
                         on_epoch=lambda e, m: tracking.log_metrics({f"pre_{k}": v for k, v in m.items()}, e))
        pre_time = time.perf_counter() - start

        # 3. Prune.
        prune_batches = data.pruning_batches(ds, p.prune_per_class, p.prune_batch_size, cfg.run.seed)
        _sync(device)
        start = time.perf_counter()
        result = pruning.prune(model, p.pruner, p.compression, prune_batches, scope=p.scope,
                               iterations=p.iterations, schedule=p.schedule, invert=p.invert,
                               shuffle=p.shuffle, seed=cfg.run.seed)
        _sync(device)
        pruning_time = time.perf_counter() - start
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

        # 4. Train the pruned network with a fresh optimizer and schedule.
        start = time.perf_counter()
        training.fit(model, train_batches, test_batches, t.post_epochs, *optimizer(),
                     on_epoch=lambda e, m: tracking.log_metrics(m, e))
        training_time = time.perf_counter() - start

        # 5. Final measurements.
        _sync(device)
        start = time.perf_counter()
        final = training.evaluate(model, test_batches)
        _sync(device)
        test_time = time.perf_counter() - start
        total_params = sum(q.numel() for q in model.parameters())
        tracking.log_metrics({
            "test_accuracy": final["top1"], "test_top5": final["top5"], "test_loss_final": final["loss"],
            "test_time": test_time, "params_total": total_params, "params_prunable": prunable,
            "params_remaining": remaining, "density": remaining / prunable,
            "compression_actual": prunable / max(remaining, 1), "pruning_time": pruning_time,
            "pretraining_time": pre_time, "training_time": training_time,
        })
        tracking.log_table([
            {"layer": n, "shape": "x".join(map(str, m.shape)), "params": m.numel(), "remaining": int(m.sum()),
             "density": float(m.float().mean())} for n, m in masking.get_masks(model).items()
        ], "layers")
        print(f"done: test top-1 {final['top1']:.2f}%, run {run.info.run_id}", flush=True)
        return run.info.run_id


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
