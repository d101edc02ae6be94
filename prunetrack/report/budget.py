"""The training budget: whether the tables' epoch count is long enough.

Runs of the main model trained for another number of epochs than the tables' runs (the
study's 10x row at 30 epochs, beside the grid at 10) stay out of the tables, since averaging
them into a cell would mix two budgets, and come here: their test top-1 and test loss per
epoch drawn over the tables' runs of the same cell, their top-1 after the tables' budget and
at their end, and whether the pruners rank the same after both.
"""
from __future__ import annotations

import os

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from prunetrack.report.figures import _colors, _save
from prunetrack.report.findings import Noise, mean_history
from prunetrack.report.records import (
    ACCURACY,
    Run,
    Study,
    cell_name,
    join_words,
    model_label,
    n_words,
    plural,
    pruner_label,
)
from prunetrack.report.tables import md_table


def longer_cells(s: Study) -> dict[tuple[str, float], list[Run]]:
    """(pruner, compression) -> the main model's runs at a longer budget than the tables'."""
    out: dict[tuple[str, float], list[Run]] = {}
    if not s.budget:  # the tables' runs did not log their epochs
        return out
    for r in s.longer:
        if r.model == s.main and _epochs(r) > s.budget:
            out.setdefault((r.pruner, r.compression), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][1], s.position(pruner=kv[0][0]))))


def _epochs(r: Run) -> int:
    return int(float(r.setting("post_epochs") or 0))


def top1_at(runs: list[Run], epoch: int) -> float | None:
    """Mean test top-1 (%) of `runs` after `epoch` epochs, from their per-epoch history."""
    values = [dict(r.histories.get("test_top1", [])).get(epoch) for r in runs]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def milestones(s: Study, runs: list[Run]) -> list[int]:
    """The epochs the table shows: every multiple of the tables' budget up to the end."""
    end = max(_epochs(r) for r in runs)
    return sorted({*range(s.budget, end + 1, s.budget), end})


def budget_table(s: Study, cells: dict) -> list[str]:
    ends = sorted({e for rs in cells.values() for e in milestones(s, rs)})
    header = ["Cell", f"Tables' runs: top-1 after {s.budget} epochs",
              *[f"Longer runs: top-1 after {e}" for e in ends], "Gain over the tables' runs", "Lowest test loss at epoch"]
    rows = []
    for (p, c), runs in cells.items():
        short = s.stat(s.main, p, c, ACCURACY.key)
        at = {e: top1_at(runs, e) for e in ends}
        final = at[ends[-1]]
        test = mean_history(runs, "test_loss")
        lowest = f"{min(test, key=lambda ev: ev[1])[0]} of {test[-1][0]}" if test else "—"
        rows.append([f"{pruner_label(p)} at {c:g}x" + (f" (n={len(runs)})" if len(runs) > 1 else ""),
                     short.fmt(lambda v: f"{v:.2f}") if short else "—",
                     *[f"{v:.2f}" if v is not None else "—" for v in at.values()],
                     f"{final - short.mean:+.2f}" if short and final is not None else "—", lowest])
    return md_table(header, rows)


def figure_budget(s: Study, cells: dict, path: str) -> bool:
    """Test top-1 (left) and loss (right) per epoch: the longer runs (solid) over the tables'
    runs of the same cell (dashed), with the longer runs' train loss (dash-dot) beside their
    test loss, since levelling off is read from both; dotted: the tables' budget."""
    if not any(r.histories.get("test_top1") for rs in cells.values() for r in rs):
        return False
    fig = Figure(figsize=(10, 3.8))
    top1, loss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = _colors(s.pruners)
    for (p, c), runs in cells.items():
        color, label = colors.get(p, "k"), f"{pruner_label(p)} {c:g}x"
        for ax, key in ((top1, "test_top1"), (loss, "test_loss")):
            longer = mean_history(runs, key)
            if longer:
                ax.plot(*zip(*longer), marker=".", ms=3, color=color, label=label)
            short = mean_history(s.cell(s.main, p, c), key)
            if short:
                ax.plot(*zip(*short), ls="--", color=color, alpha=0.7)
        train = mean_history(runs, "train_loss")
        if train:
            loss.plot(*zip(*train), ls="-.", lw=1, color=color, alpha=0.7)
    for ax, what in ((top1, "test top-1, %"), (loss, "loss")):
        ax.axvline(s.budget, color="grey", ls=":")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    top1.legend(fontsize=7)
    top1.set_title(f"solid: longer runs; dashed: the tables' runs; dotted: epoch {s.budget}", fontsize=9)
    loss.set_title("test loss (solid, dashed); train loss of the longer runs (dash-dot)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return True


def budget_findings(s: Study, cells: dict) -> list[str]:
    """Per ratio: the gain of the longer budget over the tables' and, with two or more pruners
    at it, their order after the tables' budget and at the end of the longer runs."""
    out, noise = [], Noise(s)
    for c in sorted({c for _, c in cells}):
        row = {p: rs for (p, cc), rs in cells.items() if cc == c}
        end = min(max(_epochs(r) for r in rs) for rs in row.values())
        final = {p: v for p, rs in row.items() if (v := top1_at(rs, end)) is not None}
        early = {p: v for p, rs in row.items() if (v := top1_at(rs, s.budget)) is not None}
        if not final or set(final) != set(early):
            continue
        after = sorted(final, key=lambda p: -final[p])
        before = sorted(early, key=lambda p: -early[p])
        fmt = lambda order, at: " > ".join(f"{pruner_label(p)} {at[p]:.2f}%" for p in order)
        gains = [final[p] - early[p] for p in final]
        n = n_words(len(rs) for rs in row.values())
        same = "the same run" if sum(len(rs) for rs in row.values()) == 1 else "the same runs"
        words = (f"- Training budget at {c:g}x {cell_name(s.main, None, c)}, {n} per pruner: after {end} epochs "
                 f"{fmt(after, final)}; {same} after {s.budget} epochs: {fmt(before, early)}. ")
        if len(final) >= 2:
            if after == before:
                words += "The order is the same"
            else:
                moved = [p for i, p in enumerate(after) if before[i] != p]
                words += f"The order changes ({join_words([pruner_label(p) for p in moved])} move)"
            close = [(a, b) for a, b in zip(after, after[1:])
                     if final[a] - final[b] < noise.sampling(final[a], final[b])]
            if close:
                words += ("; within the test set's sampling error at the end: "
                          + join_words([f"{pruner_label(a)}-{pruner_label(b)} ({final[a] - final[b]:.2f} points)"
                                        for a, b in close]))
            words += ". "
        # A gain below the test set's sampling error is no evidence that the longer budget helped.
        grew = [p for p in final if abs(final[p] - early[p]) >= noise.sampling(early[p], final[p])]
        gained = f"{gains[0]:+.2f}" if len(gains) == 1 else f"{min(gains):+.2f} to {max(gains):+.2f}"
        words += (f"Training {end - s.budget} epochs longer gained {gained} points of top-1, so the tables compare "
                  f"the pruners after an equal budget of {s.budget} epochs, "
                  + (f"not their accuracy at {end}." if grew else
                     f"within the test set's sampling error of their accuracy at {end}."))
        out.append(words + _loss_words(s, row, end))
    return out


def _loss_words(s: Study, row: dict, end: int) -> str:
    """Each pruner's test loss after the tables' budget against its lowest, and its train
    loss after the budget and at the end: whether the test loss had levelled off while the
    train loss went on falling."""
    parts = []
    for p, rs in row.items():
        test, train = dict(mean_history(rs, "test_loss")), dict(mean_history(rs, "train_loss"))
        if s.budget not in test:
            continue
        low_epoch = min(test, key=test.get)
        part = (f"{pruner_label(p)}: test loss {test[s.budget]:.3f} after {s.budget} epochs, "
                f"lowest {test[low_epoch]:.3f} at epoch {low_epoch}")
        if s.budget in train and end in train:
            part += f"; train loss {train[s.budget]:.3f} after {s.budget}, {train[end]:.3f} after {end}"
        parts.append(part)
    return (" " + "; ".join(parts) + ".") if parts else ""


def budget_section(s: Study, out: str, numbered) -> list[str]:
    """The section: table, figure and findings, or nothing when no run trained longer."""
    cells = longer_cells(s)
    if not cells:
        return []
    n = sum(len(rs) for rs in cells.values())
    one = n == 1
    md = ["## Training budget", "",
          f"{plural(n, 'run')} trained longer than the tables' {s.budget} epochs, in cells the tables also hold; "
          + ("it is not in the tables." if one else "they are not in the tables.")]
    same = [abs(a - b) for (p, c), rs in cells.items()
            if (a := top1_at(rs, s.budget)) is not None and (b := top1_at(s.cell(s.main, p, c), s.budget)) is not None]
    if same and max(same) < 0.005:  # the longer runs' first epochs repeat the tables' runs
        md[-1] += (f" After {s.budget} epochs, {'its' if one else 'their'} test top-1 equals that of the tables' "
                   f"{'run' if one else 'runs'} of the same cell: the first {s.budget} epochs repeat "
                   f"{'it' if one else 'them'}.")
    elif same:
        md[-1] += (f" After {s.budget} epochs, {'its' if one else 'their'} test top-1 differs from the tables' "
                   f"{'run' if one else 'runs'} of the same cell by {max(same):.2f} points"
                   + ("." if one else " at most."))
    md += [""]
    md += [f"**Table 7.** Test top-1 (%) of {model_label(s.main)} after the tables' budget and after longer "
           "training, with the epoch of the lowest test loss of the longer runs.", ""]
    md += budget_table(s, cells) + [""]
    file = "training_budget.png"
    if figure_budget(s, cells, os.path.join(out, file)):
        md += numbered.add(file, f"Test top-1 and test loss per epoch of the runs trained longer (solid) and of "
                                 f"the tables' runs of the same cells (dashed), and the train loss of the runs "
                                 f"trained longer (dash-dot); dotted: the tables' budget of {s.budget} epochs.")
    return md + budget_findings(s, cells) + [""]
