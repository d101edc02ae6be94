"""One pruning job, start to finish: build, (start from pre-trained weights), prune,
train, measure, log.

Read this file top to bottom to follow a job from the command line to the MLflow run.
Every training epoch ends with a checkpoint (`prunetrack.checkpoint`), so running the
same configuration again after a crash or a kill continues from the last finished
epoch, in the same MLflow run.
"""
from __future__ import annotations

import contextlib
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass

import mlflow
import numpy as np
import torch

from prunetrack import (
    __version__,
    checkpoint,
    data,
    estimate,
    interrupts,
    masking,
    measure,
    models,
    plots,
    progress,
    pruning,
    store,
    tracking,
    training,
)

# resolve and run_name are defined in config (torch-free); sweep imports them from here too.
from prunetrack.config import JobConfig, resolve, run_name


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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n, visible = torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
        # A sweep shows each cell only the GPU it pins it to: there, cuda:0 is that GPU.
        raise ValueError(f"device {name!r} requested but only {progress.plural(n, 'CUDA device')} "
                         f"{'is' if n == 1 else 'are'} visible"
                         + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else "")
                         + f"; use {'cuda:0' if n == 1 else f'cuda:0 to cuda:{n - 1}'}, cuda or auto")
    return device


def device_name(device: torch.device) -> str:
    """What the runs' `device` tag, the estimates and the timing passes call a device. On a
    CPU: its model, the vector instructions torch uses and its native bf16 (AMX or
    AVX512-BF16: the two compute bf16 differently, see training.cpu_bf16), since
    CPUs of one architecture differ several-fold in speed (BENCHMARKS.md: 2 cores of an
    AVX2-only EPYC train VGG16 in fp32 at a fifth of the rate of 2 cores with AVX-512)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = training.cpu_info().get("model name") or platform.processor() or platform.machine()
    isa = torch.backends.cpu.get_cpu_capability()
    if bf16 := training.cpu_bf16(device):
        isa += f", native bf16 ({bf16})"
    if cap := os.environ.get("ONEDNN_MAX_CPU_ISA"):  # oneDNN uses no instructions beyond it (e.g. no AMX)
        isa += f", ONEDNN_MAX_CPU_ISA={cap}"
    return f"cpu ({model}, {isa}, {torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def common_tags(cfg: JobConfig, device: torch.device) -> dict:
    return {"model": cfg.model.model, "dataset": cfg.data.dataset, "seed": cfg.run.seed,
            "git_commit": tracking.git_commit(), "device": device_name(device), "device_type": device.type,
            "precision": training.resolve_precision(cfg.train.precision, device),
            "prunetrack_version": __version__, "torch_version": torch.__version__,
            "mlflow_version": mlflow.__version__,
            # MLflow's GPU system metrics (nvidia-ml-py) number every GPU of the machine; this
            # says which of them the job had (a sweep pins each cell to one).
            **({"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "all")} if device.type == "cuda" else {})}


@dataclass
class Setup:
    """What every training job builds: data on the device, the model and its batch streams."""
    ds: data.Dataset
    model: torch.nn.Module   # the masked model the pruners score
    net: torch.nn.Module     # the same parameters, compiled when asked: what trains and evaluates
    stream: torch.Generator  # the training batches' order and augmentation
    train_batches: data.Batches
    test_batches: data.Batches


def build(cfg: JobConfig, device: torch.device) -> Setup:
    seed_everything(cfg.run.seed)
    training.use_device(device)
    ds = data.load(cfg.data.dataset, cfg.data.data_dir, cfg.data.download, cfg.data.train_subset,
                   cfg.data.test_subset, cfg.run.seed).to(device)
    model = masking.add_masks(models.get_model(cfg.model.model, ds.num_classes)).to(device)
    model = training.prepare(model)
    # It shares its parameters and masks with `model`, which the pruners score uncompiled.
    net = torch.compile(model) if cfg.train.compile else model
    stream = torch.Generator(device=device).manual_seed(cfg.run.seed)
    t = cfg.train
    return Setup(ds, model, net, stream,
                 data.Batches(ds.train_x, ds.train_y, t.batch_size, ds.mean, ds.std, train=True,
                              generator=stream, channels_last=True),
                 data.Batches(ds.test_x, ds.test_y, t.test_batch_size, ds.mean, ds.std, channels_last=True))


def train_phase(s: Setup, cfg: JobConfig, ckpt: checkpoint.Checkpoint, state: dict | None, run_id: str,
                phase: str, epochs: int, extra: dict, patience: int = 0) -> list[dict]:
    """Train `epochs` with a fresh optimizer and schedule, or continue from `state` (a
    checkpoint of this phase). After every epoch: checkpoint, then log the epoch's
    metrics (step = epoch). A kill between the two leaves an epoch unlogged, which the
    resume logs from the checkpoint, so a run's history never has a gap or a repeat.
    With `patience`, stop once the test loss has not improved for that many epochs and
    leave the best epoch's weights in the model. Returns the per-epoch history."""
    t = cfg.train
    opt, sched = training.make_optimizer(t.optimizer, s.model, t.lr, t.weight_decay, t.lr_drop_epochs(),
                                         t.lr_drop_rate)
    history, best, walls = [], None, []
    device = next(s.model.parameters()).device
    if state is not None:
        s.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        s.stream.set_state(state["stream"])
        checkpoint.set_rng_state(state["rng"], device)
        history, best = state["history"], state.get("best")
        # Wall seconds of each saved epoch (evaluation and checkpoint included), for the time
        # limit; a checkpoint saved before they were kept has the training seconds only.
        walls = state.get("walls") or [h["epoch_time"] for h in history if "epoch_time" in h]
        logged = tracking.logged_steps(run_id, "test_loss")
        for h in history:
            if h["epoch"] not in logged:
                tracking.log_metrics({k: v for k, v in h.items() if k != "epoch"}, h["epoch"])

    precision = training.resolve_precision(t.precision, device)

    def snapshot(epoch: int) -> dict:
        return {"run_id": run_id, "phase": phase, "epoch": epoch, "epochs": epochs, "precision": precision,
                "device": device.type, "model": s.model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "stream": s.stream.get_state(),
                "rng": checkpoint.rng_state(device), "history": history, "best": best, "walls": walls,
                "extra": extra}

    def stopped(epoch: int) -> bool:
        return bool(patience) and best is not None and epoch - best["epoch"] >= patience

    def on_epoch(epoch: int, metrics: dict) -> bool:
        nonlocal best, mark
        now = time.perf_counter()
        walls.append(now - mark)
        mark = now
        history.append({"epoch": epoch, **metrics})
        if patience and (best is None or metrics["test_loss"] < best["test_loss"]):
            best = {"epoch": epoch, "test_loss": metrics["test_loss"],
                    "model": {k: v.detach().clone() for k, v in s.model.state_dict().items()}}
        ckpt.save(snapshot(epoch))
        tracking.log_metrics(metrics, epoch)
        return stopped(epoch)

    # For the time limit, an epoch takes the median of this run's epochs, of this piece and the
    # earlier ones (one epoch slowed by another job sharing the machine does not stop the phase
    # early); before its first, what earlier runs of the same training took here, if any (the
    # query only under a time limit, once).
    guess = []

    def first_epoch() -> float | None:
        if interrupts.deadline() is None:
            return None
        if not guess:
            guess.append(estimate.earlier_epoch(cfg, tracking.experiment_of_run(run_id)))
        return guess[0]

    if state is None:  # epoch 0: what pruning produced, so a kill during epoch 1 does not prune again
        ckpt.save(snapshot(0))
    start = history[-1]["epoch"] if history else 0
    mark = time.perf_counter()
    if not stopped(start):
        try:
            training.fit(s.net, s.train_batches, s.test_batches, epochs, opt, sched, on_epoch, label=phase,
                         precision=t.precision, start_epoch=start,
                         stop_by=(lambda: best["epoch"] + patience) if patience else None,
                         epoch_estimate=lambda: statistics.median(walls) if walls else first_epoch(),
                         # after the training phase, the final measurements evaluate the test set again
                         final_evals=cfg.run.timing_repeats + 1 if phase == "train" else 0)
        except training.Diverged as e:  # the run ends FAILED (job_run); the tag and the loss show why
            tracking.log_tags({"diverged": e.epoch})
            tracking.log_metrics({"train_loss": e.loss}, e.epoch)
            raise
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, the sweep gone, the time limit: say what is kept
            held = ckpt.progress() or {"epoch": start, "epochs": epochs}
            why = f" ({e})" if isinstance(e, interrupts.TimeUp) else ""
            with contextlib.suppress(OSError):  # the stream may be the pipe of a sweep that died
                print(f"{phase}: stopped{why}; the checkpoint in {ckpt.folder} holds {phase} epoch {held['epoch']}/"
                      f"{held['epochs']}{' (before any training)' if held['epoch'] == 0 else ''}: running the "
                      f"same job again resumes from there", file=sys.stderr, flush=True)
            raise
    if stopped(history[-1]["epoch"] if history else 0):
        print(f"{phase}: the test loss has not improved for {progress.plural(patience, 'epoch')} since epoch "
              f"{best['epoch']}; stopped", flush=True)
    if patience and best is not None:
        s.model.load_state_dict(best["model"])
    return history


def load_checkpoint(ckpt: checkpoint.Checkpoint, cfg: JobConfig, device: torch.device) -> dict | None:
    """The state to resume from (None: start afresh), refusing (NotResumable, before any
    run is reopened) one that cannot be continued here:
    - one begun in another precision than `cfg`'s resolves to here: `auto` is bf16 on a
      machine with native bf16 and fp32 elsewhere, and a run trained partly in each, under
      one `precision` tag, would be neither;
    - one begun on another kind of device: a CPU's and a GPU's random streams (the data
      order and augmentation) are different generators, and one cannot take up the other's."""
    if not cfg.run.resume:
        ckpt.clear()
    state = ckpt.load()
    if not state:
        return state
    held = f"the checkpoint in {ckpt.folder} holds {state['phase']} epoch {state['epoch']}/{state['epochs']}"
    here = training.resolve_precision(cfg.train.precision, device)
    if state.get("precision", here) != here:
        why = f" ({training.WHERE_BF16_IS_NATIVE})" if cfg.train.precision == "auto" else ""
        raise checkpoint.NotResumable(
            f"{held} trained in {state['precision']}, but here precision {cfg.train.precision!r} resolves to {here}{why}, "
            f"and a run trained in two precisions would be neither: resume it on a machine where it resolves to "
            f"{state['precision']}, or start it over in {here} with --resume false")
    began = state.get("device", "cpu")  # checkpoints of earlier versions were all made on CPUs
    if began != device.type:
        raise checkpoint.NotResumable(
            f"{held} trained on {began}, but this job runs on {device.type}, whose random streams (the data order "
            f"and augmentation) cannot take up a {began}'s: resume it with --device {began}, or start it over "
            f"here with --resume false")
    return state


def prepare(cfg: JobConfig) -> torch.device:
    """Everything that can refuse a job before any run exists, done once per job:
    validate the configuration, fill its derived fields (in place) and pick the device.
    Raises ValueError naming what is wrong."""
    cfg.validate()
    device = resolve_device(cfg.run.device)
    resolve(cfg)
    return device


def run_job(cfg: JobConfig, device: torch.device | None = None) -> str:
    """Run one job; returns the MLflow run id. Raises on bad configuration before any
    run is created, and on any later failure after closing the run as FAILED.
    `device` is what `prepare(cfg)` returned when the caller prepared the job already
    (the command line does, to report a bad option as a usage error); without it the
    job is prepared here."""
    if device is None:
        device = prepare(cfg)
    p, t = cfg.prune, cfg.train
    name = run_name(cfg)
    store.prepare_store()  # a dead server fails here, in seconds; a new SQLite store is created once

    # 0. Starting weights: a shared pre-training (run once, in a run of its own), or any
    #    trained weights the user names.
    init_from = cfg.model.init_from
    if t.pre_epochs:
        from prunetrack import pretrain

        init_from = pretrain.obtain(cfg, device)

    with checkpoint.Checkpoint(cfg.run.checkpoint_dir, cfg.config_hash()) as ckpt:
        state = load_checkpoint(ckpt, cfg, device)
        resume_id = tracking.resumable(state["run_id"]) if state else None
        # Fetched before the run exists, so that a wrong --init-from is refused without one
        # (resuming, the checkpoint holds the weights: nothing to fetch).
        start_weights = tracking.load_weights(init_from) if init_from and state is None else None
        under_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))  # mlflow.start_run removes it
        with tracking.job_run(cfg.run.experiment, name, tags={"config_hash": cfg.config_hash()},
                              resume_run_id=resume_id, system_metrics=True) as run:
            run_id = run.info.run_id
            # The experiment the run is in (`mlflow run --experiment-name` decides it there).
            tracking.log_config({**cfg.flat(), "experiment": tracking.experiment_of_run(run_id)})
            tracking.log_tags({**common_tags(cfg, device), "pruner": p.pruner, "compression": f"{p.compression:g}"})
            print(f"run {run_id}: {name} on {device_name(device)}, "
                  f"{training.resolve_precision(t.precision, device)}", flush=True)
            if state:
                where = ("the same run" if run_id == state["run_id"] else
                         f"the run `mlflow run` made (run {state['run_id']} keeps its epochs)"
                         if under_mlflow_run else f"a new run (run {state['run_id']} is gone)")
                print(f"resuming from the checkpoint in {ckpt.folder}: {state['phase']} epoch "
                      f"{state['epoch']}/{state['epochs']} finished; continuing in {where}", flush=True)
                tracking.log_tags({"resumed_at_epoch": state["epoch"]})

            # 1. Model and data, seeded.
            s = build(cfg, device)
            tracking.log_tags({"dataset_sha256": s.ds.sha256, "dataset_source": data.source(s.ds),
                               "train_examples": len(s.ds.train_y), "test_examples": len(s.ds.test_y)})
            if init_from:
                if start_weights is not None:
                    load_start(s.model, start_weights, init_from)
                tracking.log_tags({"init_from": init_from,
                                   **({"pretrain_run": init_from} if t.pre_epochs else {})})

            # 2. Prune (restored from the checkpoint when resuming).
            if state is None:
                pruned = prune(s, cfg, device)
            else:
                pruned = state["extra"]
                # The masks now, to count and log them; train_phase restores the weights and the rest.
                masking.set_masks(s.model, masking.masks_in(state["model"]))
            prunable, remaining = masking.count(s.model)
            print(f"pruned with {p.pruner} in {pruned['pruning_time']:.2f}s: {remaining}/{prunable} prunable "
                  f"weights kept (density {remaining / prunable:.4f})", flush=True)
            flag_damage(pruned)
            if pruned["score_summary"]:
                tracking.log_dict(pruned["score_summary"], "score_summary.json")
            tracking.log_masks(masking.get_masks(s.model))

            # 3. Train the pruned network with a fresh optimizer and schedule.
            history = train_phase(s, cfg, ckpt, state, run_id, "train", t.post_epochs, pruned)

            # 4. Final measurements: accuracy, testing time, FLOPs, parameters, per-layer table, histograms.
            final = measure_and_log(s, cfg, device, name, pruned,
                                    training_time=sum(h["epoch_time"] for h in history))
            tracking.describe(description(cfg, training.resolve_precision(t.precision, device), init_from, final))
        # The run ended FINISHED: nothing left to resume.
        ckpt.delete()
        return run_id


def load_start(model: torch.nn.Module, weights: dict, source: str) -> None:
    """Load starting weights from `source` (masks, which weights files do not hold, stay
    as they are)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not masking.is_mask_key(k)]
    if missing or unexpected:
        raise ValueError(f"the weights in {source!r} do not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def flag_damage(pruned: dict) -> None:
    """Known failure modes of pruning, visible in the run (tags) and not only in a log: an
    emptied layer, no input-to-output path, layers with fewer weights than outputs. The
    `warning` tag holds the most severe."""
    linked = pruned.get("connected") is not False
    tags, found = {}, []
    if pruned["collapsed"]:
        tags["layer_collapse"] = ",".join(pruned["collapsed"])
        found.append(pruning.collapse_message(pruned["collapsed"], linked))
    if not linked:  # whether or not a layer is empty: the output no longer sees the input
        tags["disconnected"] = "true"
        if not pruned["collapsed"]:  # the collapse message already says so
            found.append(pruning.DISCONNECTED)
    if pruned.get("near_collapse"):
        tags["near_collapse"] = ",".join(pruned["near_collapse"])
        found.append(f"near layer collapse: {len(pruned['near_collapse'])} layer(s) keep fewer weights than they "
                     f"have outputs ({', '.join(pruned['near_collapse'])}), so some of their outputs are cut off "
                     f"from every input")
    if found:
        tracking.log_tags({**tags, "warning": found[0]})
    for warning in found:
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)


def prune(s: Setup, cfg: JobConfig, device: torch.device) -> dict:
    """Score and mask; returns what the rest of the job (and a resume) needs to know."""
    p = cfg.prune
    if cfg.dense():
        # Compression 1 keeps every weight whatever the pruner: nothing to score.
        tracking.log_tags({"dense": "true"})
        result, pruning_time = None, 0.0
    else:
        batches = data.pruning_batches(s.ds, p.prune_per_class, p.prune_batch_size, cfg.run.seed)
        # Timed once, between device synchronizations, by the same helper as the testing time.
        timed = measure.time_repeats(
            lambda: pruning.prune(s.model, p.pruner, p.compression, batches, scope=p.scope, iterations=p.iterations,
                                  schedule=p.schedule, invert=p.invert, shuffle=p.shuffle, seed=cfg.run.seed,
                                  mode=p.prune_mode,
                                  progress=progress.Progress(f"pruning with {p.pruner}", p.iterations, unit="round")),
            repeats=1, warmup=0, device=device)
        result, pruning_time = timed.result, timed.median
    if p.reinit:  # ablation: same masks, fresh weights
        pruning.reinitialize(s.model, cfg.run.seed + 1)
    return {"pruning_time": pruning_time, "collapsed": result.collapsed if result else [],
            "near_collapse": result.near_collapse if result else [],
            "connected": result.connected if result else None,
            "score_summary": result.score_summary if result else {},
            # what training starts from, for the histograms
            "init_weights": measure.surviving_weights(s.model)}


def measure_and_log(s: Setup, cfg: JobConfig, device: torch.device, name: str, pruned: dict,
                    training_time: float) -> dict:
    """Measure the trained network and log what it is; returns the final metrics."""
    t = cfg.train
    # The warm-up evaluation gives the accuracy; the timed repeats give test_time.
    timing = measure.time_repeats(lambda: training.evaluate(s.net, s.test_batches, t.precision),
                                  repeats=cfg.run.timing_repeats, warmup=1, device=device)
    final = timing.result
    flops = measure.count_flops(s.model, torch.zeros(1, *s.ds.test_x.shape[1:], device=device))
    layer_density = measure.densities(s.model)
    flops_effective = flops.effective_total(layer_density)
    prunable, remaining = masking.count(s.model)
    metrics = {
        # test_top5 and test_loss keep their last per-epoch values (same model, same data).
        "test_accuracy": final["top1"],
        # The spread of the repeats and the threads beside the median: on a shared machine
        # identical work varies by half (`prunetrack time` measures under equal conditions).
        "test_time": timing.median, "test_time_min": min(timing.times), "test_time_max": max(timing.times),
        "test_time_threads": torch.get_num_threads(), "test_images_per_sec": len(s.ds.test_y) / timing.median,
        "test_time_batch_size": t.test_batch_size,
        "flops_dense": flops.total, "flops_effective": flops_effective,
        "macs_dense": flops.total / 2, "macs_effective": flops_effective / 2,
        "theoretical_speedup": flops.total / max(flops_effective, 1.0),
        "params_total": sum(q.numel() for q in s.model.parameters()), "params_prunable": prunable,
        "params_remaining": remaining, "density": remaining / prunable,
        "compression_actual": prunable / max(remaining, 1), "pruning_time": pruned["pruning_time"],
        "training_time": training_time,
    }
    tracking.log_metrics(metrics)
    if device.type == "cuda":  # the whole job's, training included: what a GPU must hold for it
        tracking.log_metrics({"peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20})
    rows = measure.layer_rows(s.model, flops)
    tracking.log_table(rows, "layers")
    histograms = measure.histogram_record(pruned["init_weights"], measure.surviving_weights(s.model), layer_density)
    tracking.log_dict(histograms, "histograms.json")
    tracking.log_figure(plots.histogram_figure(histograms, f"{name}: surviving weights"), "weight_histograms.png")
    tracking.log_figure(plots.density_figure(rows, f"{name}: density per layer"), "layer_density.png")
    print(f"test time {timing.median:.3f}s (median of {len(timing.times)}), "
          f"{flops_effective / 1e9:.4g} of {flops.total / 1e9:.4g} GFLOPs per image", flush=True)
    print(f"done: test top-1 {final['top1']:.2f}%", flush=True)
    return metrics


def description(cfg: JobConfig, precision: str, init_from: str, m: dict) -> str:
    """What a finished run is and what it found, in a sentence (the run's Description in the
    MLflow UI); `m` holds its final metrics."""
    p, t = cfg.prune, cfg.train
    ablations = [a for a in ("shuffle", "reinit", "invert") if getattr(p, a)]
    start = (f"the weights of pre-training run {init_from}" if t.pre_epochs else
             f"the weights of {init_from}" if init_from else "a fresh initialization")
    pruned = ("not pruned (compression 1: the dense network)" if cfg.dense() else
              f"pruned {p.compression:g}x by {p.pruner} ({p.scope} scope, {progress.plural(p.iterations, 'round')}"
              f"{', ablation: ' + ', '.join(ablations) if ablations else ''})")
    return (f"{cfg.model.model} on {cfg.data.dataset} from {start}, {pruned}, then trained "
            f"{progress.plural(t.post_epochs, 'epoch')} ({t.optimizer}, lr {t.lr:g}, {precision}): "
            f"**test top-1 {m['test_accuracy']:.2f}%**, {int(m['params_remaining']):,} of "
            f"{int(m['params_prunable']):,} prunable weights kept, {m['flops_effective'] / 1e6:.1f} of "
            f"{m['flops_dense'] / 1e6:.1f} MFLOPs per image.\n\n"
            "Artifacts: `masks.pt` (`prunetrack.load_masks`), `layers.json` (the per-layer table), "
            "`layer_density.png`, `weight_histograms.png` (numbers in `histograms.json`), `config.yaml`.")
