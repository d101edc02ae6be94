"""Pre-training done once: a run of its own (tag `prunetrack.kind` = pretrain) that
every job with the same model, data, seed and training settings starts from.

Magnitude pruning ranks trained weights, so each Magnitude cell of a study needs a
trained network; with the same seed and settings they all need the *same* one. The
first job (or the sweep, before its cells) trains it, logging its per-epoch curves
and the weights (`weights.pt`); later jobs find the FINISHED run by its
`pretrain_hash` tag and load them, tagging themselves `pretrain_run`. Like a job, a
pre-training checkpoints every epoch and resumes after an interruption.
"""
from __future__ import annotations

import os

import torch

from prunetrack import checkpoint, data, masking, progress, store, tracking
from prunetrack.config import PRETRAIN_FIELDS, JobConfig


def experiment_of(cfg: JobConfig) -> str:
    """Under `mlflow run` the job's experiment is mlflow's; the pre-training goes beside it."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return tracking.experiment_of_run(os.environ["MLFLOW_RUN_ID"])
    return cfg.run.experiment


def obtain(cfg: JobConfig, device: torch.device) -> str:
    """The run id of the FINISHED pre-training `cfg` asks for, running it first if there
    is none. Two jobs that need the same one at once: the second waits for the first."""
    store.prepare_store()
    experiment, key = experiment_of(cfg), cfg.pretrain_hash()
    found = tracking.find_pretrain(experiment, key)
    if found:
        print(f"pre-training: starting from run {found} ({cfg.train.pre_epochs} epochs at most, "
              f"done before)", flush=True)
        return found
    with checkpoint.Checkpoint(cfg.run.checkpoint_dir, checkpoint.pretrain_key(key), wait=True) as ckpt:
        found = tracking.find_pretrain(experiment, key)  # finished while we waited
        if found:
            print(f"pre-training: starting from run {found}, finished by another job", flush=True)
            return found
        return run_pretrain(cfg, device, experiment, ckpt)


def run_pretrain(cfg: JobConfig, device: torch.device, experiment: str, ckpt: checkpoint.Checkpoint) -> str:
    from prunetrack import job, training

    t = cfg.train
    state = job.load_checkpoint(ckpt, cfg, device)
    resume_id = tracking.resumable(state["run_id"]) if state else None
    name = f"{cfg.model.model}-pretrain-{t.pre_epochs}ep-s{cfg.run.seed}"
    # Under `mlflow run`, MLFLOW_RUN_ID names the job's run; the pre-training is another.
    with store.environ(MLFLOW_RUN_ID=None), tracking.job_run(
            experiment, name, tags={tracking.KIND_TAG: "pretrain", "pretrain_hash": cfg.pretrain_hash()},
            resume_run_id=resume_id, system_metrics=True) as run:
        run_id = run.info.run_id
        flat = cfg.flat()
        tracking.log_config({k: flat[k] for k in PRETRAIN_FIELDS})
        tracking.log_tags(job.common_tags(cfg, device))
        print(f"run {run_id}: pre-training {name} on {job.device_name(device)}, "
              f"{training.resolve_precision(t.precision, device)}"
              + (f", stopping after {t.pre_patience} epochs without a better test loss" if t.pre_patience else ""),
              flush=True)
        if state:
            print(f"resuming the pre-training from {ckpt.folder}: epoch {state['epoch']}/{state['epochs']} "
                  f"finished", flush=True)
        s = job.build(cfg, device)
        tracking.log_tags({"dataset_sha256": s.ds.sha256, "dataset_source": data.source(s.ds)})
        history = job.train_phase(s, cfg, ckpt, state, run_id, "pre-train", t.pre_epochs, {},
                                  patience=t.pre_patience)
        best = min(history, key=lambda h: h["test_loss"]) if t.pre_patience else history[-1]
        tracking.log_metrics({"epochs_run": len(history), "best_epoch": best["epoch"],
                              "best_test_loss": best["test_loss"], "best_test_top1": best["test_top1"],
                              "pretraining_time": sum(h["epoch_time"] for h in history)})
        tracking.log_tags({"stopped": "patience" if len(history) < t.pre_epochs else "pre_epochs"})
        tracking.describe(
            f"Pre-training of {cfg.model.model} on {cfg.data.dataset} (seed {cfg.run.seed}), shared by every "
            f"cell that prunes trained weights (Magnitude): {progress.plural(len(history), 'epoch')} of at most "
            f"{t.pre_epochs}" + (f", stopped once the test loss had not improved for {progress.plural(t.pre_patience, 'epoch')}"
                                 if len(history) < t.pre_epochs else "")
            + f"; `weights.pt` holds epoch {best['epoch']} (test loss {best['test_loss']:.4f}, top-1 "
            f"{best['test_top1']:.2f}%).")
        weights = {k: v for k, v in s.model.state_dict().items() if not masking.is_mask_key(k)}
        tracking.log_weights(weights)
        tracking.log_tags({"weights_sha256": tracking.weights_digest(weights)})
        print(f"pre-training done: {len(history)} epochs, weights of epoch {best['epoch']} "
              f"(test loss {best['test_loss']:.4f}, top-1 {best['test_top1']:.2f}%)", flush=True)
    ckpt.delete()
    return run_id
