"""The study against the SynFlow paper (Tanaka et al. 2020): its VGG-16 / CIFAR-10 protocol
next to the one the runs logged, what the differences predict for absolute accuracies, and
the SynFlow accuracies here against the dense baseline. The paper gives those accuracies as
curves (its Figure 6), not a table, so the section says where to compare, not a number.
"""
from __future__ import annotations

from collections import Counter

from prunetrack.report.records import ACCURACY, NOT_LOGGED, Study, cell_name, join_words, model_label
from prunetrack.report.tables import md_table

# The SynFlow paper's training protocol for VGG-16 on CIFAR-10 (Tanaka et al. 2020,
# "Pruning neural networks without any data by iteratively conserving synaptic flow",
# hyperparameters as released with its code), against which the study's protocol differs.
SYNFLOW_PAPER = [
    ("model", "Model", "VGG-16 with BatchNorm"),
    ("optimizer", "Optimizer", "SGD, momentum 0.9 (Nesterov)"),
    ("lr", "Learning rate", "0.1"),
    ("lr_drops", "LR drops (epochs)", "60, 120 (x0.1)"),
    ("weight_decay", "Weight decay", "1e-4"),
    ("batch_size", "Batch size (train)", "128"),
    ("post_epochs", "Training epochs", "160"),
    ("iterations", "SynFlow iterations", "100"),
    ("prune_per_class", "Pruning data (examples per class)", "10"),
    ("dataset_source", "Data", "official CIFAR-10 release"),
]
PAPER_EPOCHS = 160


def protocol_words(s: Study, runs) -> tuple[str, bool]:
    """These runs' training in words, and whether it is as long and scheduled as the paper's."""
    opt, epochs = s.common("optimizer", runs) or "?", s.common("post_epochs", runs) or "?"
    drops, wd = s.common("lr_drops", runs) or "", s.common("weight_decay", runs) or "0"
    has, lacks = [], []
    (has if drops else lacks).append(f"lr drops at epochs {drops}" if drops else "an lr schedule")
    (has if wd != "0" else lacks).append(f"weight decay {wd}" if wd != "0" else "weight decay")
    (has if s.main.endswith("_bn") else lacks).append("BatchNorm")
    words = f"{epochs} epoch{'s' * (epochs != '1')} of {opt}"
    words += " " + ", ".join(([f"with {join_words(has)}"] if has else []) + ([f"without {' or '.join(lacks)}"] if lacks else []))
    try:
        close = float(epochs) >= PAPER_EPOCHS and opt in ("sgd", "momentum") and bool(drops) and wd != "0"
    except ValueError:
        close = False
    return words, close


def synflow_paper_section(s: Study) -> list[str]:
    """How the runs' protocol differs from the SynFlow paper's, and where to compare: the
    paper gives VGG-16/CIFAR-10 accuracies as curves (its Figure 6), not as a table."""
    model = s.main  # the model of Table 2 and the accuracy figure
    if s.dataset != "cifar10" or not model.startswith("vgg16"):
        return []
    runs = [r for r in s.runs if r.model == model]
    rows = []
    for key, title, theirs in SYNFLOW_PAPER:
        if key == "model":
            ours = model_label(model)
        else:
            group = [r for r in runs if r.pruner == "synflow"] if key == "iterations" else runs
            seen = Counter(r.setting(key) for r in group if r.setting(key) is not None)
            ours = " / ".join(f"{v or '(none)'}" for v, _ in seen.most_common()) or NOT_LOGGED
        rows.append([title, theirs, ours])
    md = ["## Comparison with the SynFlow paper", "",
          "Tanaka et al. (2020) prune VGG-16 on CIFAR-10 with the same five methods and report top-1 test "
          "accuracy against compression as curves (their Figure 6, VGG-16 / CIFAR-10 panel), not as a table; "
          "read this report's Table 2 and its accuracy-against-compression figure against that panel. Their "
          "protocol differs from the one these runs followed:", ""]
    md += md_table(["Setting", "SynFlow paper", f"These runs ({model_label(model)})"], rows)
    ours, close = protocol_words(s, runs)
    if close:
        predict = (f"These runs train for {ours}, close to the paper's 160 epochs of SGD with lr drops, weight "
                   "decay and BatchNorm, so absolute accuracies should land near the paper's")
    else:
        predict = (f"What the differences predict: 160 epochs of SGD with lr drops, weight decay and BatchNorm "
                   f"reach a higher dense accuracy than these runs' {ours}, so absolute accuracies "
                   "here are expected below the paper's at every ratio")
    source = s.common("dataset_source", runs)
    if source and "jpeg" in source.lower():
        predict += (", and the data these runs used is a JPEG round trip of CIFAR-10 (tag `dataset_source`), "
                    "which lowers them a little more")
    elif source:
        predict += f"; the data these runs used: {source} (tag `dataset_source`)"
    md += ["", predict + ". The comparison that carries over is the shape: how far each pruner falls below the "
               "dense baseline as compression grows, and their order at each ratio.", ""]
    base, _ = s.baseline(model, ACCURACY.key)
    notes = []
    for c in s.compressions:
        st = s.stat(model, "synflow", c, ACCURACY.key)
        if st and base and c > 1:
            notes.append(f"{c:g}x: {st.mean:.2f}% ({st.mean - base.mean:+.2f} vs dense)")
    if base:
        md += [f"Here, dense {model_label(model)} reaches {base.mean:.2f}% {cell_name(model, None, 1.0)}; "
               "SynFlow: " + ("; ".join(notes) if notes else "no run above 1x") + ".", ""]
    return md
