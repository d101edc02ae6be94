"""Throughput benchmark: prunetrack's training path against the reference pipeline of
the field, side by side in one run.

Reference pipeline (as in the Synaptic-Flow code): a torchvision DataLoader over PIL
images with per-image transforms (RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Normalize), masked layers recomputing weight * mask on every forward
(torch.nn.utils.prune), float32, default memory layout.

prunetrack: the dataset resident on the device as uint8, batched augmentation there,
masks applied once after each optimizer step, channels-last, bf16 autocast where the
hardware has native bf16 (and fp32 beside it), optionally torch.compile. The matmul peak
of each precision is measured in the same run, and training is shown as a share of it.

    python benchmarks/throughput.py                        # CPU or the first GPU
    python benchmarks/throughput.py --models vgg16 --steps 50 --data-dir data

Prints one table per section, with prunetrack / reference ratios. Uses CIFAR-10 from
--data-dir when present, else synthetic images of the same shape.
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.utils import prune as tprune

from prunetrack import data, masking, measure, models, pruning, training
from prunetrack.job import device_name


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def load_images(data_dir: str, n_train: int, n_test: int) -> data.Dataset:
    try:
        ds = data.load("cifar10", data_dir, download=False)
    except FileNotFoundError:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n_train + n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n_train + n_test,), generator=g)
        ds = data.Dataset("random", x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10,
                          (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), "")
    ds.train_x, ds.train_y = ds.train_x[:n_train], ds.train_y[:n_train]
    ds.test_x, ds.test_y = ds.test_x[:n_test], ds.test_y[:n_test]
    return ds


# ---------------------------------------------------------------------------- the reference pipeline

class PILDataset(torch.utils.data.Dataset):
    """CIFAR images as PIL, transformed one at a time, as torchvision's CIFAR10 does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std, train: bool):
        import torchvision.transforms as T

        self.x, self.y = x.permute(0, 2, 3, 1).contiguous().numpy(), y.tolist()
        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
        self.transform = T.Compose([*augment, T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def reference_loader(ds, batch_size, train, workers, device):
    return torch.utils.data.DataLoader(PILDataset(ds.train_x if train else ds.test_x,
                                                  ds.train_y if train else ds.test_y, ds.mean, ds.std, train),
                                       batch_size=batch_size, shuffle=train, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=train,
                                       persistent_workers=workers > 0)


def reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The same network and masks, but with weight = weight_orig * mask recomputed on every forward."""
    ref = copy.deepcopy(model)
    for m in masking.prunable_layers(ref).values():
        tprune.custom_from_mask(m, "weight", m.prune_mask.float())
    return ref


# ---------------------------------------------------------------------------- measurements

def images_per_second(step, batches, steps: int, warmup: int, device) -> float:
    """Run `step(x, y)` over `warmup` then `steps` batches; images per second of the timed part.
    Batches come from `batches` (an iterable, restarted when exhausted), moved to the device."""
    it = iter(batches)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(batches)
            return next(it)

    for _ in range(warmup):
        x, y = next_batch()
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    measure.device_sync(device)()
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next_batch()
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        seen += len(y)
    measure.device_sync(device)()
    return seen / (time.perf_counter() - start)


def prunetrack_train_step(model, precision, device):
    """A job's training step: its optimizer (fused Adam) and `training.train_step`."""
    opt = training.make_optimizer("adam", model, 1e-3, 0.0, [], 0.1)[0]
    return lambda x, y: training.train_step(model, x, y, opt, precision, device)


def reference_train_step(model):
    """The reference's step: plain Adam, fp32; the masks act inside the forward."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def eval_step_fn(model, precision, device):
    @torch.no_grad()
    def step(x, y):
        with training.autocast(precision, device):
            model(x).argmax(1)

    return step


def gemm_peak(device, dtype, repeats: int = 5, scale: int = 1) -> dict[str, float]:
    """GFLOP/s of large GEMM-shaped work in `dtype`: a 4096x4096 matrix product, and the same
    work as a 1x1 convolution (oneDNN's kernels on CPU, which the models' convolutions use;
    torch's fp32 matmul goes through another library that can be slower on some CPUs). Their
    maximum is the practical peak that training throughput is compared with. Unlike a 3x3
    convolution, neither can take an algorithmic shortcut (Winograd) that does fewer
    multiplications than the FLOP count says. `scale` divides the work's sides (for
    arithmetic so slow that the full size would take many minutes: emulated bf16)."""
    def best(fn, flops):  # one warm-up, then the fastest of `repeats` synchronized runs
        return flops / min(measure.time_repeats(fn, repeats=repeats, warmup=1, device=device).times) / 1e9

    n = 4096 // scale
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    x = torch.randn(64 // scale**2, 1024, 16, 16, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(1024, 1024, 1, 1, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    return {"matmul": best(lambda: a @ b, 2 * n**3),
            "conv1x1": best(lambda: F.conv2d(x, w), 2 * x.shape[0] * 16 * 16 * 1024 * 1024)}


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vgg16,resnet50")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: 50 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 10 on CUDA, 1 on CPU)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds of training/evaluation timing per pipeline; the median is shown")
    ap.add_argument("--workers", type=int, default=-1, help="reference DataLoader workers (default: CPUs, max 8)")
    ap.add_argument("--compile", action="store_true", help="also time prunetrack with torch.compile")
    ap.add_argument("--pruners", default=",".join(pruning.PRUNERS))
    ap.add_argument("--prune-iterations", type=int, default=0,
                    help="rounds per pruner (0: each pruner's default; synflow's is 100)")
    ap.add_argument("--compression", type=float, default=10)
    ap.add_argument("--precisions", default="",
                    help="prunetrack's precisions to time, e.g. fp32,bf16 (default: what auto picks here, and "
                         "fp32 beside it); bf16 on a CPU without native bf16 is emulated, several times slower")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    steps = args.steps or (50 if cuda else 3)
    warmup = args.warmup or (10 if cuda else 1)
    rounds = max(1, args.rounds)
    workers = args.workers if args.workers >= 0 else min(8, len(__import__("os").sched_getaffinity(0)))
    precision = training.resolve_precision("auto", device)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()] or list(dict.fromkeys([precision, "fp32"]))
    unknown = [p for p in precisions if p not in ("fp32", "bf16")]
    if unknown:
        ap.error(f"--precisions takes fp32 and bf16, got {', '.join(unknown)}")
    native = training.native_bf16(device)
    bs = args.batch_size
    n_train = bs * (max(steps, 100) + warmup + 1)
    ds = load_images(args.data_dir, min(50000, n_train), min(10000, bs * (steps + warmup)))
    print(f"device: {device_name(device)}; torch {torch.__version__}; batch {bs}; {steps} timed steps after "
          f"{warmup}; data: {ds.name}; reference DataLoader workers: {workers}; prunetrack precision (auto): "
          f"{precision}, channels-last")

    # 0. The machine's GEMM peak in each precision: what a training step could reach at best.
    # Emulated bf16 is timed on work of a quarter of the sides (1/64 of the FLOPs), once.
    gemms = {"fp32": gemm_peak(device, torch.float32),
             "bf16": gemm_peak(device, torch.bfloat16) if native else gemm_peak(device, torch.bfloat16, 1, 4)}
    peaks = {p: max(g.values()) for p, g in gemms.items()}
    table("GEMM peak (best of 5), GFLOP/s: 4096x4096 matmul, and the same work as a 1x1 convolution"
          + ("" if native else "; bf16 is emulated here (no native bf16): 1024x1024, the same work as a 1x1 "
             "convolution, one run"),
          ["precision", "matmul", "1x1 convolution", "peak (the larger)"],
          [[p, *(f"{v:,.0f}" if v >= 10 else f"{v:.1f}" for v in (g["matmul"], g["conv1x1"], peaks[p]))]
           for p, g in gemms.items()])

    # 1. The data path alone: augmented, normalized batches on the device.
    gen = torch.Generator(device=device).manual_seed(0)
    on_device = ds.train_x.to(device), ds.train_y.to(device)
    ours = data.Batches(*on_device, bs, ds.mean, ds.std, train=True, generator=gen, channels_last=True)
    ref = reference_loader(ds, bs, True, workers, device)
    # Cheap per batch, so timed over more batches than the training steps for a steadier
    # rate, and in alternating rounds like the training numbers below.
    data_steps = max(steps, 100)
    rates = {"prunetrack": [], "reference": []}
    for _ in range(rounds):
        for label, batches in (("prunetrack", ours), ("reference", ref)):
            rates[label].append(images_per_second(lambda x, y: None, batches, data_steps, warmup, device))
    ours_rate, ref_rate = statistics.median(rates["prunetrack"]), statistics.median(rates["reference"])
    table(f"Data path (augmented training batches on the device, {data_steps} batches, median of {rounds} "
          "alternating round(s)), images/s",
          ["pipeline", "images/s"], [["prunetrack", f"{ours_rate:,.0f}"], ["reference", f"{ref_rate:,.0f}"],
                                     ["ratio", f"{ours_rate / ref_rate:.1f}x"]])

    # 2. Training and evaluation throughput, 10x-pruned (random masks) networks.
    rows = []
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        model = masking.add_masks(models.get_model(model_name)).to(device)
        pruning.prune(model, "rand", args.compression)
        ref_model = reference_model(model)
        model = training.prepare(model)  # as jobs build it
        variants = [(f"prunetrack {p}" + (" (emulated)" if p == "bf16" and not native else ""), model, ours, p)
                    for p in precisions]
        if args.compile:
            variants.append((f"prunetrack+compile {precision}", torch.compile(model), ours, precision))
        variants.append(("reference", ref_model, ref, "fp32"))
        # Rounds alternate the pipelines (A B A B ...) so that drift in clock speed or
        # background load hits both alike; each pipeline's number is its median round.
        test_ours = data.Batches(ds.test_x.to(device), ds.test_y.to(device), bs, ds.mean, ds.std,
                                 channels_last=True)
        test_ref = reference_loader(ds, bs, False, workers, device)
        runners = {label: (net, prunetrack_train_step(net, prec, device) if batches is ours
                           else reference_train_step(net), eval_step_fn(net, prec, device),
                           batches, test_ours if batches is ours else test_ref)
                   for label, net, batches, prec in variants}
        samples = {label: ([], [], []) for label in runners}
        for _ in range(rounds):
            for label, (net, train_step, eval_step, batches, test_batches) in runners.items():
                reset_peak(device)
                net.train()
                samples[label][0].append(images_per_second(train_step, batches, steps, warmup, device))
                net.eval()
                samples[label][1].append(images_per_second(eval_step, test_batches, steps, warmup, device))
                samples[label][2].append(peak_memory_mb(device))
        results = {label: (statistics.median(t), statistics.median(e), max(m)) for label, (t, e, m) in samples.items()}
        # A training step is about 3 forward passes of work (forward, and the input and
        # weight gradients); dense kernels do all of it whatever the masks.
        step_flops = 3 * measure.count_flops(model, torch.zeros(1, 3, 32, 32, device=device)).total
        prec_of = {label: prec for label, _, _, prec in variants}
        for label, (train, evals, peak) in results.items():
            spread = (f" ({min(samples[label][0]):,.0f}-{max(samples[label][0]):,.0f})" if rounds > 1 else "")
            gflops = train * step_flops / 1e9
            share = gflops / peaks["bf16" if prec_of[label] == "bf16" else "fp32"]
            rows.append([model_name, label, f"{train:,.0f}{spread}", f"{gflops:,.0f} ({share:.0%})", f"{evals:,.0f}",
                         f"{peak:,.0f}"])
        base = results["reference"]
        for label, (train, evals, _) in results.items():
            if label != "reference":
                per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(samples[label][0], samples["reference"][0]))
                rows.append([model_name, f"{label} / reference", f"{train / base[0]:.2f}x"
                             + (f" (rounds: {per_round})" if rounds > 1 else ""), "", f"{evals / base[1]:.2f}x", ""])
    table(f"Training and evaluation, {args.compression:g}x pruned, batch {bs}, images/s "
          f"(median of {rounds} alternating round(s){'; train range in brackets' if rounds > 1 else ''})",
          ["model", "pipeline", "train img/s", "train GFLOP/s (of its precision's peak)", "eval img/s",
           "peak GPU MB" if cuda else "peak RSS MB (process, so far)"], rows)

    # 3. Pruning time per pruner (prunetrack; the pruning data is 10 images per class).
    rows = []
    batches = data.pruning_batches(data.Dataset(ds.name, *on_device, ds.test_x, ds.test_y, 10, ds.mean,
                                                ds.std, ""), 10, bs, 0)
    for model_name in args.models.split(","):
        for pruner in args.pruners.split(","):
            torch.manual_seed(0)
            model = masking.add_masks(models.get_model(model_name)).to(device)
            reset_peak(device)
            measure.device_sync(device)()
            start = time.perf_counter()
            result = pruning.prune(model, pruner, args.compression, batches, iterations=args.prune_iterations)
            measure.device_sync(device)()
            rows.append([model_name, pruner, result.rounds, f"{time.perf_counter() - start:.2f}",
                         f"{peak_memory_mb(device):,.0f}"])
    table(f"Pruning to {args.compression:g}x", ["model", "pruner", "rounds", "seconds",
                                               "peak GPU MB" if cuda else "peak RSS MB (process, so far)"], rows)


if __name__ == "__main__":
    main()
