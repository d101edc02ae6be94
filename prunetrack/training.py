"""Optimizers, the learning-rate schedule, and the train / evaluate loops."""
from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunetrack import config, interrupts, masking
from prunetrack.progress import Progress, clock

# The registry of named choices: name -> optimizer(params, lr, weight_decay, fused).
# `fused` runs the whole update in a few kernels instead of several per parameter
# group (torch's fused Adam/SGD; about 1.7x faster steps on CPU as well). RMSprop has
# no fused form.
OPTIMIZERS: dict[str, Callable] = {
    "adam": lambda params, lr, wd, fused: torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused),
    "sgd": lambda params, lr, wd, fused: torch.optim.SGD(params, lr=lr, weight_decay=wd, fused=fused),
    "momentum": lambda params, lr, wd, fused: torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=0.9,
                                                              nesterov=True, fused=fused),
    "rms": lambda params, lr, wd, fused: torch.optim.RMSprop(params, lr=lr, weight_decay=wd),
}
config.check_registry("optimizers", OPTIMIZERS)

PRECISIONS = config.PRECISIONS

WHERE_BF16_IS_NATIVE = "bf16 is native only on CUDA GPUs since Ampere and on CPUs with AMX or AVX512-BF16"


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (`model name`, `flags`, ...); empty
    where there is no such file (not Linux)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():  # the first processor's block ends here
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_flags() -> frozenset[str]:
    return frozenset(cpu_info().get("flags", "").split())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a GPU of compute capability 8.0 or later
    (Ampere; older ones emulate it), or a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return cpu_bf16(device) is not None


def cpu_bf16(device: torch.device) -> str | None:
    """The native bf16 of a CPU, by the instructions oneDNN computes it with (Linux
    /proc/cpuinfo flags): AMX tiles where the CPU has them, else AVX512-BF16 dot products;
    None where it has neither (or `device` is no CPU). A CPU with neither only emulates bf16
    in oneDNN, slower than fp32, so `auto` must not pick bf16 there. Runs of the same settings
    on AMX and on AVX512-BF16 did not repeat each other to the bit."""
    flags = cpu_flags() if device.type == "cpu" else frozenset()
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the hardware has native bf16 (BENCHMARKS.md: about 2x the fp32
    training throughput on CPU, several times on CUDA), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bf16 autocast for the forward pass and the loss where `precision` (resolved) says
    so; plain fp32 otherwise. Weights, gradients and optimizer state stay fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# TF32 (a 10-bit mantissa) is cuDNN's default for fp32 convolutions on Ampere and later.
# Set through the allow_tf32 flags, which every torch since 2.4 reads: once torch 2.9's
# fp32_precision settings are used, torch.backends.cudnn.flags() and the allow_tf32
# getters (torch.compile's convolution templates read one) raise.


def use_device(device: torch.device) -> None:
    """The arithmetic a job sets for its device, once: on CUDA, fp32 convolutions and
    matrix products in IEEE fp32, not TF32 (a run tagged fp32 is fp32; under bf16 autocast
    they are bf16 anyway), and cuDNN picking its fastest algorithms for the fixed batch
    shapes. Nothing changes on a CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def exact_fp32():
    """Pruning scores in IEEE fp32 and, on CUDA, from deterministic algorithms: the same
    seed gives the same masks (autotuned cuDNN algorithms can differ from run to run).
    Restores the settings on the way out; no effect on a CPU."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic
    cudnn.allow_tf32 = matmul.allow_tf32 = cudnn.benchmark = False
    cudnn.deterministic = True
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved


def prepare(model: nn.Module) -> nn.Module:
    """The layout jobs train and evaluate in: channels-last activations and weights,
    cuDNN's fastest (tensor-core) convolutions on CUDA and oneDNN's on CPU (BENCHMARKS.md:
    VGG16 trains 5-10% faster on CPU)."""
    return model.to(memory_format=torch.channels_last)


def make_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, lr_drops: list[int],
                   lr_drop_rate: float):
    """A fresh optimizer and its schedule (stepped once per epoch)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    params = list(model.parameters())
    # Fused kernels exist for float parameters on CPU and CUDA; anything else uses the default.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    opt = OPTIMIZERS[name](params, lr, weight_decay, fused)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=lr_drops, gamma=lr_drop_rate)
    return opt, sched


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt, precision: str,
               device: torch.device) -> torch.Tensor:
    """One optimizer step on a batch, pruned weights re-zeroed after it. Returns the
    loss, still on the device (reading it would wait for the device)."""
    with autocast(precision, device):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    masking.apply_masks(model)
    return loss.detach()


def train_epoch(model: nn.Module, batches, opt, progress: Callable[[int, int], None] | None = None,
                precision: str = "fp32") -> float:
    """One pass over `batches`; pruned weights are re-zeroed after every step.
    Returns the mean training loss. The loss is summed on the device and read once
    at the end, so the loop never waits for the device."""
    model.train()
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    seen = 0
    for i, (x, y) in enumerate(batches):
        total += train_step(model, x, y, opt, precision, device) * len(y)
        seen += len(y)
        if progress:
            progress(i + 1, seen)
    return float(total) / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, batches, precision: str = "fp32",
             progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (in percent) over `batches`."""
    model.eval()
    device = next(model.parameters()).device
    loss = torch.zeros((), device=device, dtype=torch.float64)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for i, (x, y) in enumerate(batches):
        with autocast(precision, device):
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum").double()
        best = out.topk(min(5, out.shape[1]), dim=1).indices
        hits = best == y[:, None]
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        n += len(y)
        if progress:
            progress(i + 1, n)
    return {"loss": float(loss) / n, "top1": 100.0 * int(top1) / n, "top5": 100.0 * int(top5) / n}


class Diverged(FloatingPointError):
    """The training loss of an epoch is not finite: the weights are lost, so the job stops."""

    def __init__(self, label: str, epoch: int, loss: float, lr: float):
        super().__init__(f"{label} diverged at epoch {epoch}: the training loss is {loss} (lr {lr:g}); "
                         f"lower the learning rate (--lr) and run again")
        self.epoch, self.loss = epoch, loss


def fit(model: nn.Module, train_batches, test_batches, epochs: int, opt, sched,
        on_epoch: Callable[[int, dict], bool | None], label: str = "train", precision: str = "fp32",
        start_epoch: int = 0, stop_by: Callable[[], int] | None = None,
        epoch_estimate: Callable[[], float | None] | None = None, final_evals: int = 0) -> int:
    """Train epochs start_epoch+1 .. `epochs`, evaluating after each; `on_epoch(epoch,
    metrics)` checkpoints and logs, and may return True to stop early. Returns the last
    epoch run. Each epoch's line ends with an estimate of the time left in the phase, at
    the pace of the last epochs;
    with `stop_by` (the epoch by which an early stop ends the phase unless the test loss
    improves again, read after on_epoch), with both that and the time to `epochs`.
    Raises Diverged when an epoch's training loss is nan or inf, and interrupts.TimeUp
    rather than start an epoch that would not end before the time limit: as long as
    `epoch_estimate()` says an epoch takes, else the mean of the epochs run here (without
    either, it stops only once the limit has passed); the last epoch with the `final_evals`
    passes over the test set that follow it, at the evaluation time measured here."""
    spent, done, epoch, evaluating, took = 0.0, 0, start_epoch, 0.0, []
    for epoch in range(start_epoch + 1, epochs + 1):
        expected = epoch_estimate() if epoch_estimate else None
        expected = expected if expected is not None else (spent / done if done else None)
        then = f"an epoch takes ~{clock(expected or 0)}"
        if epoch == epochs and final_evals and done:
            expected += final_evals * evaluating / done
            then += f", the measurements after the last ~{clock(final_evals * evaluating / done)}"
        if not interrupts.time_left(expected):
            left = interrupts.seconds_left()
            raise interrupts.TimeUp(f"time limit: {label} epoch {epoch}/{epochs} would not end before it; "
                                    + (f"{then}, {clock(left)} was left" if left > 0 else "it had passed"))
        start = time.perf_counter()
        train_loss = train_epoch(model, train_batches, opt, Progress(f"{label} epoch {epoch}", len(train_batches)),
                                 precision)
        if not math.isfinite(train_loss):  # stop before this epoch is checkpointed or evaluated
            raise Diverged(label, epoch, train_loss, opt.param_groups[0]["lr"])
        sched.step()
        seconds = time.perf_counter() - start
        ev = evaluate(model, test_batches, precision, Progress(f"{label} epoch {epoch} evaluation", len(test_batches)))
        evaluated = time.perf_counter() - start - seconds
        evaluating += evaluated
        metrics = {"train_loss": train_loss, "test_loss": ev["loss"], "test_top1": ev["top1"],
                   "test_top5": ev["top5"], "epoch_time": seconds, "eval_time": evaluated}
        stop = on_epoch(epoch, metrics)
        took.append(time.perf_counter() - start)  # the checkpoint and the logging too
        spent, done = spent + took[-1], done + 1
        # The time left at the pace of the last epochs (the median of 3: one epoch slowed by other
        # work on the machine, or one after it ended, does not swing it), not the mean since the start.
        per_epoch = statistics.median(took[-3:])
        if stop:
            left = "stopping early"
        elif stop_by is not None and stop_by() < epochs:
            # A patience stop: the phase's length is not known in advance, only its bounds.
            by = stop_by()
            left = (f"~{clock(per_epoch * (by - epoch))} left in {label} if the test loss does not improve again "
                    f"(the patience stops it after epoch {by}), at most ~{clock(per_epoch * (epochs - epoch))}")
        else:
            left = f"~{clock(per_epoch * (epochs - epoch))} left in {label}"
        print(f"{label} epoch {epoch}/{epochs}: train loss {train_loss:.4f}, test loss {ev['loss']:.4f}, "
              f"top-1 {ev['top1']:.2f}%, top-5 {ev['top5']:.2f}% ({seconds:.1f}s; {left})", flush=True)
        if stop:
            break
    return epoch
