"""Does inference time depend on which weights are zero? `prunetrack time` assumes not
(dense kernels), and times runs imported without their masks under masks with the same
number of survivors per layer at random places. This checks it on the machine at hand:
one model pruned by a real pruner, the same per-layer counts at random places, and the
unpruned network, timed in interleaved rounds, side by side.

    python benchmarks/mask_placement.py                       # VGG16-BN, SNIP at 10x, 2,000 test images
    python benchmarks/mask_placement.py --pruner synflow --compression 20 --test-subset 10000
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunetrack import data, masking, measure, models, pruning, training
from prunetrack.job import device_name, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vgg16_bn")
    ap.add_argument("--pruner", default="snip", choices=list(pruning.PRUNERS))
    ap.add_argument("--compression", type=float, default=10)
    ap.add_argument("--test-subset", type=int, default=2000, help="test images per evaluation (0: all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--data-dir", default="data")
    args = ap.parse_args()

    device = resolve_device(args.device)
    training.use_device(device)
    precision = training.resolve_precision(args.precision, device)
    ds = data.load("cifar10", args.data_dir, download=False, test_subset=args.test_subset).to(device)
    test = data.Batches(ds.test_x, ds.test_y, 256, ds.mean, ds.std, channels_last=True)

    torch.manual_seed(0)
    pruned = masking.add_masks(models.get_model(args.model, ds.num_classes)).to(device)
    batches = data.pruning_batches(ds, 10, 256, seed=0, channels_last=True)
    masks = pruning.prune(pruned, args.pruner, args.compression, batches).masks
    # The same number of survivors in each layer, at random places (what `prunetrack time`
    # builds for a run without masks).
    shuffled = masking.add_masks(models.get_model(args.model, ds.num_classes))
    masking.set_masks(shuffled, masking.masks_with_counts(shuffled, {n: int(m.sum()) for n, m in masks.items()}, 1))
    dense = masking.add_masks(models.get_model(args.model, ds.num_classes))
    nets = {f"{args.pruner} {args.compression:g}x, its masks": pruned,
            f"{args.pruner} {args.compression:g}x counts, random places": shuffled, "unpruned": dense}
    nets = {k: training.prepare(v.to(device)).eval() for k, v in nets.items()}

    sync = measure.device_sync(device)
    times = {k: [] for k in nets}
    for net in nets.values():  # warm-up: kernel choice, caches
        training.evaluate(net, test, precision)
    for r in range(args.rounds):
        order = list(nets)[r % len(nets):] + list(nets)[:r % len(nets)]
        for k in order:
            sync()
            t0 = time.perf_counter()
            training.evaluate(nets[k], test, precision)
            sync()
            times[k].append(time.perf_counter() - t0)

    base = statistics.median(times["unpruned"])
    print(f"{args.model}, {len(ds.test_y):,} test images, batch 256, {precision}, {device_name(device)}, "
          f"median of {args.rounds} interleaved rounds")
    print("| network | median s | min-max s | / unpruned |")
    print("|---|--:|--:|--:|")
    for k, ts in times.items():
        print(f"| {k} | {statistics.median(ts):.3f} | {min(ts):.3f}-{max(ts):.3f} | {statistics.median(ts) / base:.3f} |")


if __name__ == "__main__":
    main()
