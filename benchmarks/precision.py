"""Does bf16 autocast cost accuracy? Short real-data jobs in fp32 and in bf16, side by
side, several seeds each, through the normal job pipeline (so every run is in MLflow).

    python benchmarks/precision.py                      # ResNet-20, 20k CIFAR-10 images, CPU or GPU
    python benchmarks/precision.py --model vgg16 --epochs 10 --train-subset 0   # on a GPU

Prints one row per precision: test accuracy (mean ± std over seeds, and each seed),
final test loss and training throughput, then the bf16 - fp32 accuracy difference
against the seed-to-seed spread. Pairs with the same seed share masks and data order.
bf16 autocast on CPU needs a CPU with bf16 instructions (AVX512-BF16 or AMX) to be fast;
it is correct anywhere.
"""
from __future__ import annotations

import argparse
import statistics

import mlflow

from prunetrack.config import JobConfig
from prunetrack.job import run_job


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ResNet-20 learns within a few epochs on a CPU; VGG16 without BatchNorm can sit at
    # chance through the first epochs of a short run, where no difference could show.
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--pruner", default="synflow")
    ap.add_argument("--compression", type=float, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-subset", type=int, default=20000, help="0: the whole training set")
    ap.add_argument("--test-subset", type=int, default=0, help="0: the whole test set")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--experiment", default="precision-check")
    args = ap.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for precision in ("fp32", "bf16"):
        for seed in seeds:
            cfg = JobConfig.from_flat(dict(
                dataset="cifar10", data_dir=args.data_dir, model=args.model, pruner=args.pruner,
                compression=args.compression, post_epochs=args.epochs, train_subset=args.train_subset,
                test_subset=args.test_subset, seed=seed, precision=precision, device=args.device,
                experiment=args.experiment, run_name=f"{args.model}-{precision}-s{seed}", timing_repeats=1))
            run = mlflow.get_run(run_job(cfg))
            m = run.data.metrics
            # epoch_time: the last epoch's training pass alone (no evaluation, no warm-up).
            results[(precision, seed)] = (m["test_accuracy"], m["test_loss"], m["epoch_time"],
                                          int(run.data.tags["train_examples"]))

    print(f"\n{args.model}, {args.pruner} at {args.compression:g}x, {args.epochs} epochs, "
          f"train subset {args.train_subset or 'all'}, test subset {args.test_subset or 'all'}, seeds {seeds}")
    header = ["precision", "test accuracy %", "per seed", "test loss", "train img/s (last epoch)"]
    rows = []
    acc = {}
    for precision in ("fp32", "bf16"):
        vals = [results[(precision, s)] for s in seeds]
        acc[precision] = [v[0] for v in vals]
        std = statistics.stdev(acc[precision]) if len(seeds) > 1 else 0.0
        ips = statistics.fmean(v[3] / v[2] for v in vals)
        rows.append([precision, f"{statistics.fmean(acc[precision]):.2f} ± {std:.2f}",
                     ", ".join(f"{a:.2f}" for a in acc[precision]),
                     f"{statistics.fmean(v[1] for v in vals):.4f}", f"{ips:,.0f}"])
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    diffs = [b - f for f, b in zip(acc["fp32"], acc["bf16"])]
    spread = statistics.stdev(acc["fp32"]) if len(seeds) > 1 else float("nan")
    print(f"\nbf16 - fp32, same seed: {', '.join(f'{d:+.2f}' for d in diffs)} points "
          f"(mean {statistics.fmean(diffs):+.2f}); fp32 seed-to-seed std: {spread:.2f} points")


if __name__ == "__main__":
    main()
