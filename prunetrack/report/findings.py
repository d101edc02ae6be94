"""Step 4: the report's prose, every sentence generated from the study's records:
findings, the loss curves' convergence, the pre-training, and the comparison with the
SynFlow paper."""
from __future__ import annotations

import statistics
from collections import Counter
from typing import NamedTuple

from prunetrack.report.records import (
    ACCURACY,
    PRETRAINED_AGAIN,
    TIMED_TEST_TIME,
    UNSHARED_AT_1X,
    WEIGHTS_DIGEST,
    Pretrain,
    Run,
    Stat,
    Study,
    cell_name,
    history_gap,
    join_words,
    model_label,
    n_words,
    names,
    plural,
    pruner_label,
    pruner_name,
    round_range,
    same_training,
    timing_passes,
    value_range,
)
from prunetrack.tracking import IMPORTED_FROM


def findings(s: Study) -> list[str]:
    out = ranking_findings(s)
    out += baseline_findings(s)
    out += layer_findings(s)
    out += speedup_findings(s)
    out += loss_findings(s)
    return out or ["- Not enough runs for any comparison."]


class Noise:
    """How far apart two cells' mean accuracies must be before the report calls them
    different: twice the standard error of the difference, from the seed-to-seed spread
    where some cells have several seeds, and never below the 95% sampling error of the
    test set (the same N test images score every cell)."""

    def __init__(self, s: Study):
        M = s.main
        multi = [(c, p, st) for c in s.compressions for p in s.pruners
                 if (st := s.stat(M, p, c, ACCURACY.key)) and st.n > 1]
        dof = sum(st.n - 1 for _, _, st in multi)
        self.sd = (sum((st.n - 1) * st.std ** 2 for _, _, st in multi) / dof) ** 0.5 if dof else None
        self.cells = [cell_name(M, p, c) for c, p, _ in multi]
        sizes = Counter(r.tags.get("test_examples") for r in s.runs if r.model == M)
        size = sizes.most_common(1)[0][0] if sizes else None
        self.test_size = int(size) if size and str(size).isdigit() else None

    def sampling(self, a: float, b: float) -> float:
        """95% half-width, in points, of the difference of two accuracies (%) on the test set."""
        if not self.test_size:
            return 0.0
        pa, pb = a / 100, b / 100
        return 196 * ((pa * (1 - pa) + pb * (1 - pb)) / self.test_size) ** 0.5

    def threshold(self, a: Stat, b: Stat) -> float:
        seeds = 2 * self.sd * (1 / a.n + 1 / b.n) ** 0.5 if self.sd is not None else 0.0
        return max(seeds, self.sampling(a.mean, b.mean))

    def words(self, typical: float) -> str:
        size = f"{self.test_size:,} test images" if self.test_size else "a test-set size not logged"
        test = (f"the test set's sampling error ({size}: ±{self.sampling(typical, typical):.2f} points, 95%, for "
                f"two accuracies near {typical:.0f}%)")
        if self.sd is None:
            return (f"- Noise: every cell is a single run (n=1), so the seed-to-seed spread is not measured; a "
                    f"difference is called within noise when it is below {test}. Seeds add their own spread to "
                    f"that, so a difference just above it is not established either.")
        return (f"- Noise: the seed-to-seed standard deviation, pooled over the {plural(len(self.cells), 'cell')} "
                f"with several seeds ({join_words(self.cells)}), is {self.sd:.2f} points; a difference is called "
                f"within noise when it is below twice the standard error of the difference "
                f"({2 * self.sd * 2 ** 0.5:.2f} points between two single runs), or below {test}.")


def ranking_findings(s: Study) -> list[str]:
    """Per ratio: the pruners by mean test accuracy, with n and spread, and which gaps
    to the best are within noise."""
    M, noise, out = s.main, Noise(s), []
    for c in s.compressions:
        stats = {p: st for p in s.pruners if (st := s.stat(M, p, c, ACCURACY.key))}
        if len(stats) < 2 or c == 1.0:
            continue
        order = sorted(stats, key=lambda p: -stats[p].mean)
        best, seeds = order[0], n_words(st.n for st in stats.values())
        values = ", ".join(f"{pruner_label(p)} {stats[p].fmt(lambda v: f'{v:.2f}%')}"
                           for p in order)
        close = [p for p in order[1:] if stats[best].mean - stats[p].mean < noise.threshold(stats[best], stats[p])]
        apart = [p for p in order[1:] if p not in close]
        words = f"- At {c:g}x {cell_name(M, None, c)}, {seeds} per pruner: {values}. **{pruner_label(best)}** is highest"
        if close:
            words += (f"; {join_words([pruner_label(p) for p in close])} "
                      f"{'is' if len(close) == 1 else 'are'} within noise of it "
                      f"({', '.join(f'{stats[best].mean - stats[p].mean:.2f}' for p in close)} points)")
        if apart:
            beyond = "the noise" if noise.sd is not None else "the test set's sampling error"
            words += (f"; {join_words([f'{pruner_label(p)} ({stats[best].mean - stats[p].mean:.2f} points)' for p in apart])}"
                      f" {'is' if len(apart) == 1 else 'are'} below it by more than {beyond}")
        out.append(words + precision_caveat(s, {p: s.cell(M, p, c) for p in order}) + ".")
    if out:
        typical = statistics.fmean(st.mean for c in s.compressions for p in s.pruners
                                   if (st := s.stat(M, p, c, ACCURACY.key)))
        out.insert(0, noise.words(typical))
    return out


def precision_caveat(s: Study, cells: dict[str, list[Run]]) -> str:
    """A clause for compared cells ({pruner: runs}) of which some trained in another precision
    than the study's: the gaps between them include the change ("" when none did; when every
    run trained in one other precision, the gaps hold one arithmetic and the clause says so)."""
    other = {p: ps for p, runs in cells.items() if (ps := s.other_precisions(runs))}
    if not other:
        return ""
    used = join_words(sorted({x for ps in other.values() for x in ps}))
    trained = {r.setting("precision") for runs in cells.values() for r in runs}
    if len(trained) == 1:
        # Every run of every compared cell in the same other precision (seeds included): among
        # themselves the gaps hold one arithmetic; the change is against the other ratios.
        return (f"; {'both' if len(cells) == 2 else 'all'} trained in {used}, not the study's "
                f"{s.precision}: one precision within this ratio, another than most cells of the others")
    rest = len(cells) - len(other)
    if not rest:
        # Each cell has a run in another precision, and some run is in the study's: the cells
        # mix precisions between seeds, so no cell is wholly in one to compare the rest with.
        return (f"; runs of {join_words([pruner_label(p) for p in other])} trained in {used}, the rest in "
                f"{s.precision}, so their gaps include a change of precision")
    return (f"; {join_words([pruner_label(p) for p in other])} trained in {used}, the "
            f"{'other' if rest == 1 else 'others'} in {s.precision}, so "
            f"{'its gap to the others includes' if len(other) == 1 else 'their gaps to the others include'} "
            "a change of precision")


def layer_findings(s: Study) -> list[str]:
    """Layers pruned most and least at the focus ratio, and every run whose pruning emptied a
    layer, cut the input off from the output, or left a layer fewer weights than outputs."""
    M, F, out = s.main, s.opts.focus, []
    for p in s.pruners:
        found = s.layer_stats(p, "density")
        if not found:
            continue
        stats = found[1]
        lo = min(stats, key=lambda k: stats[k].mean)
        hi = max(stats, key=lambda k: stats[k].mean)
        out.append(f"- {pruner_label(p)} at {F:g}x {cell_name(M, p, F)} prunes `{lo}` most (density "
                   f"{stats[lo].mean:.4f}) and `{hi}` least (density {stats[hi].mean:.4f}).")
    runs = [r for r in s.runs if r.model == M]
    flagged = False
    for r in runs:
        cell = f"{cell_name(M, r.pruner, r.compression)} run {r.label}"
        if r.tags.get("layer_collapse"):
            flagged = True
            out.append(f"- Layer collapse in {cell}: every weight of "
                       f"{', '.join(f'`{x}`' for x in r.tags['layer_collapse'].split(','))} was pruned"
                       + ("; no path links the input to the output." if r.tags.get("disconnected") else
                          "; other paths still link the input to the output."))
        elif r.tags.get("disconnected"):
            flagged = True
            out.append(f"- Disconnected: {cell} keeps weights in every layer, but no path through them links the "
                       f"input to the output.")
        if r.tags.get("near_collapse"):
            flagged = True
            layers = r.tags["near_collapse"].split(",")
            dens = {row["layer"]: float(row["density"]) for row in (r.layers or []) if row.get("density") is not None}
            lowest = min((x for x in layers if x in dens), key=dens.get, default=None)
            out.append(f"- Near collapse in {cell}: {plural(len(layers), 'layer')} keep fewer weights than they have "
                       f"outputs ({', '.join(f'`{x}`' for x in layers)})"
                       + (f"; `{lowest}` keeps {dens[lowest]:.2%} of its weights" if lowest else "") + ".")
    if not flagged:
        out.append(f"- No layer collapse, disconnection or near-collapse (a layer with fewer weights than outputs) "
                   f"in any of the {plural(len(runs), 'run')} of {model_label(M)}.")
    return out


def baseline_findings(s: Study) -> list[str]:
    """What the dense baseline is made of, and, at each ratio, whether each pruner is below it,
    within noise of it, or above it (Magnitude against its own pre-trained 1x, when it has one)."""
    M = s.main
    base, runs = s.baseline(M, ACCURACY.key)
    _, left_out = s.baseline_runs(M)
    if base is None:
        return [f"- No dense baseline: no finished run of {model_label(M)} at 1x trained from scratch, so no drop "
                "below it can be stated."]
    used = [r for r in runs if ACCURACY.key in r.metrics]
    each = ", each counted once" if len(used) > 1 else ""
    words = (f"- Dense baseline {cell_name(M, None, 1.0)}: {base.mean:.2f}% test accuracy, from "
             f"{plural(len(used), 'run')} of {model_label(M)} at 1x trained from scratch{each} ({names(used)})")
    if left_out:
        words += (f"; left out: {plural(len(left_out), 'run')} at 1x that start{'s' * (len(left_out) == 1)} from "
                  f"a pre-training, not the dense network trained from scratch ({names(left_out)})")
    out = [words + "."]
    noise = Noise(s)
    for p in s.pruners:
        tested = [(c, st) for c in s.compressions if c > 1 and (st := s.stat(M, p, c, ACCURACY.key))]
        if not tested:
            continue
        if p in UNSHARED_AT_1X:  # starts from pre-trained weights: its own 1x is its like-for-like reference
            own = s.stat(M, p, 1.0, ACCURACY.key)
            if own is None:
                d = tested[-1][1].mean - base.mean
                out.append(f"- {pruner_label(p)} starts from pre-trained weights, so its reference is its own 1x "
                           f"{cell_name(M, p, 1.0)} (the pre-trained network trained on unpruned), which has no "
                           f"finished run yet. Against the dense baseline ({d:+.2f} points at {tested[-1][0]:g}x) "
                           f"the comparison is not like for like: its network trained for the pre-training's "
                           f"epochs before it was pruned.")
                continue
            ref, where = own, f"its own 1x, pre-trained and trained unpruned, {own.mean:.2f}% {cell_name(M, p, 1.0)}"
        else:
            ref, where = base, f"the dense baseline, {base.mean:.2f}% {cell_name(M, None, 1.0)}"
        verdicts = []
        for c, st in tested:
            d, limit = st.mean - ref.mean, noise.threshold(st, ref)
            verdict = "within noise" if abs(d) < limit else ("below" if d < 0 else "above") + " by more than noise"
            other = s.other_precisions(s.cell(M, p, c))
            verdict += f", trained in {join_words(other)}" if other else ""
            if p in UNSHARED_AT_1X and bool(s.pretrained_again(s.cell(M, p, c))) != bool(
                    s.pretrained_again(s.cell(M, p, 1.0))):
                verdict += f", pruned from another pre-training than its 1x ({PRETRAINED_AGAIN})"
            verdicts.append((c, st, d, verdict))
        listed = ", ".join(f"{c:g}x {st.mean:.2f}% ({d:+.2f}, {v})" for c, st, d, v in verdicts)
        below = next((c for c, _, _, v in verdicts if v.startswith("below")), None)
        if len(verdicts) == 1:  # the verdict in brackets says it all
            end = ""
        elif below is not None:
            end = f"; it first falls below it by more than noise at **{below:g}x**"
        else:
            end = f"; it is not below it by more than noise at any ratio run, up to {verdicts[-1][0]:g}x"
        out.append(f"- {pruner_label(p)} against {where}: {listed}{end}.")
    return out


def _ranges_overlap(a: list[Run], b: list[Run], key: str) -> bool:
    """Whether the ranges over timing rounds of runs `a` and of runs `b` overlap (False when
    either has no range logged)."""
    ra, rb = round_range(a, key), round_range(b, key)
    return bool(ra and rb) and ra[0] <= rb[1] and rb[0] <= ra[1]


class _Speedup(NamedTuple):
    pruner: str
    compression: float
    predicted: float   # dense FLOPs over effective FLOPs
    time: float        # the cell's testing time
    measured: float    # the dense network's testing time over the cell's


def speedup_findings(s: Study) -> list[str]:
    """Measured testing-time speedup over the dense baseline against the speedup FLOPs predict."""
    M, metric = s.main, s.time_metric
    base, base_runs = s.baseline(M, metric.key)
    if base is None:
        return [f"- Testing time against theoretical speedup: no dense (1x) run of {model_label(M)} trained "
                f"from scratch logged `{metric.key}`."]
    if metric.key == TIMED_TEST_TIME.key:
        out = [f"- Testing times below are `{metric.key}`, from the controlled timing pass (Table 3)."]
    else:
        out = [f"- Testing times below are the jobs' own `{metric.key}`, measured while training shared the "
               "machine: the speedups are not comparable across cells."]
    missing, cells, unmeasurable, elsewhere = [], [], [], []
    base_passes = timing_passes(base_runs)
    for c in s.compressions:
        if c == 1.0:
            continue
        for p in s.pruners:
            runs = s.cell(M, p, c)
            t = s.stat(M, p, c, metric.key)
            theo = [r.metrics.get("theoretical_speedup") or
                    (r.metrics["flops_dense"] / r.metrics["flops_effective"]
                     if r.metrics.get("flops_effective") and "flops_dense" in r.metrics else None) for r in runs]
            theo = [x for x in theo if x]
            if t is None:
                continue
            if not theo:
                missing.append(cell_name(M, p, c))
                continue
            cell = _Speedup(p, c, statistics.fmean(theo), t.mean, base.mean / t.mean)
            passes = timing_passes(runs)
            if base_passes and passes and not passes & base_passes:
                # Passes drift apart by more than their rounds' spread: only cells timed in the
                # dense network's pass can say whether pruning bought time.
                elsewhere.append(cell)
                continue
            cells.append(cell)
            if _ranges_overlap(runs, base_runs, metric.key):
                unmeasurable.append(cell)
    dense = f"{metric.fmt(base.mean)} {metric.unit} dense {cell_name(M, None, 1.0)}"
    ratio = "{:.2f}".format
    grouped = len(unmeasurable) > 1  # one sentence for all of them, below
    for x in cells:
        if grouped and x in unmeasurable:
            continue
        out.append(f"- {cell_name(M, x.pruner, x.compression)}: FLOPs predict a {x.predicted:.2f}x speedup; measured "
                   f"testing time {metric.fmt(x.time)} {metric.unit} vs {dense} is a {x.measured:.2f}x speedup "
                   f"({x.measured / x.predicted:.0%} of the predicted)"
                   + ("; its rounds' range overlaps the dense network's, so no speedup is measurable."
                      if x in unmeasurable else "."))
    if grouped:
        if len(unmeasurable) == len(cells):
            where = f"{'both' if len(cells) == 2 else f'all {len(cells)}'} pruned cells of {model_label(M)}"
        else:
            by_pruner = {x.pruner: [y.compression for y in unmeasurable if y.pruner == x.pruner] for x in unmeasurable}
            where = (f"{len(unmeasurable)} of {len(cells)} pruned cells ("
                     + join_words([f"{pruner_label(p)} at {', '.join(f'{c:g}' for c in cs)}x"
                                   for p, cs in by_pruner.items()]) + ")")
        out.append(f"- No measurable speedup in {where}: FLOPs predict "
                   f"{value_range([x.predicted for x in unmeasurable], ratio)}x speedups; measured testing times of "
                   f"{value_range([x.time for x in unmeasurable], metric.fmt)} {metric.unit} vs {dense} are "
                   f"{value_range([x.measured for x in unmeasurable], ratio)}x speedups, and each cell's range over "
                   "its rounds overlaps the dense network's. The masks zero weights inside dense tensors, so "
                   "inference still runs the dense convolutions: fewer FLOPs need sparse kernels or structured "
                   "(channel) pruning to become time.")
    if elsewhere:
        out.append(f"- Not compared with the dense network: {join_words([cell_name(M, x.pruner, x.compression) for x in elsewhere])} "
                   f"{'was' if len(elsewhere) == 1 else 'were'} timed in another pass than it, and passes differ by more "
                   f"than their rounds' spread (FLOPs predict {value_range([x.predicted for x in elsewhere], ratio)}x "
                   "speedups); `prunetrack time` without `--untimed` times every cell in one pass.")
    if missing:
        out.append(f"- No FLOPs logged for {', '.join(missing)}, so their measured testing time cannot be "
                   "compared with a theoretical speedup.")
    return out if cells or missing or elsewhere else []


def mean_history(runs, key: str) -> list[tuple[int, float]]:
    """The per-epoch mean of a metric over runs, at the epochs every run logged."""
    series = [dict(r.histories.get(key, [])) for r in runs]
    series = [h for h in series if h]
    if not series:
        return []
    epochs = sorted(set.intersection(*(set(h) for h in series)))
    return [(e, statistics.fmean(h[e] for h in series)) for e in epochs]


def loss_findings(s: Study) -> list[str]:
    """Per pruner at the focus ratio: where the test loss is lowest and how much it still
    moved over the last 3 epochs, so the epoch count can be judged."""
    M, F, out, falling = s.main, s.opts.focus, [], {}
    for p in s.pruners:
        runs = s.cell(M, p, F)
        if not runs:
            continue
        test, train = mean_history(runs, "test_loss"), mean_history(runs, "train_loss")
        cell = f"{pruner_label(p)} at {F:g}x {cell_name(M, p, F)}"
        over = f", mean of {len(runs)} runs" if len(runs) > 1 else ""
        if len(test) < 2:
            out.append(f"- Loss curves, {cell}: {plural(len(test), 'epoch')} of test loss logged{over}, too few to tell "
                       "whether training levelled off.")
            continue
        best_epoch, best = min(test, key=lambda ev: ev[1])
        last_epoch, last = test[-1]
        first_epoch, first = test[max(0, len(test) - 4)]
        span = len(test) - 1 - max(0, len(test) - 4)
        change = (last - first) / first if first else float("nan")
        tail = f"; train loss {train[-1][1]:.4f} at epoch {train[-1][0]}" if train else ""
        out.append(f"- Loss curves, {cell}: test loss lowest at epoch {best_epoch} of {last_epoch} ({best:.4f}); "
                   f"over the last {span} epoch{'s' * (span > 1)} (epoch {first_epoch} to {last_epoch}) it changed "
                   f"by {change:+.1%}, to {last:.4f}{tail}{over}.")
        if span == 3 and best_epoch == last_epoch and change < -STILL_FALLING:
            falling[p] = change
    if falling:
        every = len(falling) == len(out)
        who = "every pruner" if every else join_words([pruner_label(p) for p in falling])
        spread = value_range([abs(v) for v in falling.values()], "{:.1%}".format)
        out.append(f"- Not levelled off: at {F:g}x the test loss of {who} was still at its lowest on the last epoch "
                   f"and had fallen by {spread} over the last 3 epochs, so "
                   + ("the accuracies compare the pruners" if every else "their accuracies are measured")
                   + " after an equal, short training budget, not at convergence"
                   + (" (the Training budget section shows runs trained longer)." if s.longer else "."))
    return out


# A test loss that fell by more than this over the last 3 epochs is still falling.
STILL_FALLING = 0.02


def _int(x) -> str:
    try:
        return f"{int(float(x))}"
    except (TypeError, ValueError):
        return "?"


def pretrain_sentence(pre: Pretrain, shared: bool) -> str:
    m, params = pre.metrics, pre.params
    users = Counter(pruner_name(r.pruner) for r in pre.users)
    who = join_words(sorted(users)) if users else "No run"
    epochs = _int(m.get("epochs_run", len(pre.histories.get("test_loss", []))))
    cap, patience, stopped = params.get("pre_epochs"), params.get("pre_patience"), pre.tags.get("stopped")
    best = (f"best test loss {m['best_test_loss']:.4f}, top-1 {m['best_test_top1']:.2f}%"
            if "best_test_loss" in m and "best_test_top1" in m else "best test loss not logged")
    text = (f"{who} prune{'s' * (len(users) == 1)} the weights of {'one shared' if shared else 'a'} pre-training "
            f"(run {pre.label}; {plural(len(pre.users), 'run')} start{'s' * (len(pre.users) == 1)} from it): {plural(epochs, 'epoch')}")
    if "pretraining_time" in m:
        text += f" in {m['pretraining_time']:.0f} s"
    if stopped == "patience":
        text += (f", stopped because the test loss had not improved for {plural(_int(patience), 'epoch')} since epoch "
                 f"{_int(m.get('best_epoch'))} ({best}); the cap of {_int(cap)} epochs (`pre_epochs`) is an upper "
                 "bound, not the count trained")
    elif stopped == "pre_epochs":
        how = (f"the test loss still improving within {plural(_int(patience), 'epoch')} (`pre_patience`)"
               if _int(patience) not in ("0", "?") else "without early stopping (`pre_patience` 0)")
        text += (f", all of its cap of {_int(cap)} epochs (`pre_epochs`), {how}; the pruned weights are those of "
                 f"epoch {_int(m.get('best_epoch'))} ({best})")
    else:
        text += f" of at most {_int(cap)} (`pre_epochs`); why it stopped was not logged (tag `stopped`) ({best})"
    return text + "."


def gap_words(gap: dict[str, tuple[int, float]]) -> str:
    return "by at most " + join_words([f"{v:.4g} in {k}" for k, (_, v) in gap.items() if v])


def twin_sentence(pre: Pretrain, twin: Run) -> str:
    """Whether a dense run repeats the pre-training it shares every setting with: a check of
    determinism, and of resuming, when either was resumed from a checkpoint."""
    gap = history_gap(pre, twin)
    if not gap:
        return ""
    epochs = max(n for n, _ in gap.values())
    resumed = [f"{r.name} at epoch {r.tags['resumed_at_epoch']}" for r in (pre, twin) if r.tags.get("resumed_at_epoch")]
    text = (f"Reproducibility: the dense run {twin.label} has every setting of this pre-training (model, seed, data, "
            f"optimizer, precision) and prunes nothing, so its {plural(epochs, 'epoch')} should repeat the "
            f"pre-training's. ")
    if all(v == 0 for _, v in gap.values()):
        text += f"They do, exactly: {join_words(list(gap))} are equal at every epoch. Training here is deterministic"
        if resumed:
            text += f", and resuming from a checkpoint (last: {join_words(resumed)}) does not change it"
        return text + "."
    if devices := other_devices(pre, twin):
        return text + (f"They differ, {gap_words(gap)} (the largest gap over the epochs), and trained {devices}: "
                       "the kernels of different processors need not round alike, so this compares the two "
                       "devices, not two trainings on one.")
    devices = [r.tags.get("device") for r in (pre, twin)]
    if None not in devices and same_device(*devices) is None:
        return text + (f"They differ, {gap_words(gap)} (the largest gap over the epochs); their `device` tags "
                       f"(`{devices[0]}`, `{devices[1]}`) do not tell whether they trained on one kind of processor "
                       "with the same arithmetic, so this says nothing about whether training here repeats itself.")
    return text + ("They differ, " + gap_words(gap) + " (the largest gap over the epochs): the arithmetic is not bit-for-bit repeatable here, so "
                   "differences of that size between runs are noise, not an effect of their settings.")


ARCHITECTURES = {"x86_64", "AMD64", "aarch64", "arm64", "i386", "i686", ""}  # what stands in for an unnamed CPU model


def device_parts(tag: str) -> dict:
    """A `device` tag (job.device_name) as the parts it names; a part the tag's format
    leaves out is absent. CPU tags: model, ISA, native bf16 ('none', the path 'AMX' or
    'AVX512-BF16', or '?' where older tags said only 'native bf16'), oneDNN's ISA cap
    and threads. A GPU's tag is its name."""
    if not (tag.startswith("cpu (") and tag.endswith(")")):
        return {"gpu": tag}
    *named, threads = tag[len("cpu ("):-1].split(", ")
    parts = {"threads": threads}
    if named and named[0] not in ARCHITECTURES:
        parts["model"] = named[0]
    if len(named) < 2:  # the oldest tags: an architecture and the threads only
        return parts
    parts["isa"], parts["bf16"] = named[1], "none"
    for part in named[2:]:
        if part.startswith("native bf16"):
            parts["bf16"] = part[len("native bf16 ("):-1] if part.endswith(")") else "?"
        elif part.startswith("ONEDNN_MAX_CPU_ISA="):
            parts["cap"] = part.split("=", 1)[1]
    if parts["bf16"] != "?":  # tags that name the bf16 path also name the cap, where one was set
        parts.setdefault("cap", "none")
    return parts


def same_device(a: str, b: str) -> bool | None:
    """Whether two `device` tags name the same processor and arithmetic: False where a part
    both name differs, True where both name every part alike, None where the tags cannot
    tell (older tags left the model or the bf16 path out; identical text is not enough)."""
    pa, pb = device_parts(a), device_parts(b)
    if ("gpu" in pa) != ("gpu" in pb):
        return False
    both = pa.keys() & pb.keys()
    for key in both:
        if pa[key] != pb[key] and not (key == "bf16" and "?" in (pa[key], pb[key]) and "none" not in (pa[key], pb[key])):
            return False
    if "gpu" in both:
        return True
    known = {"model", "isa", "bf16", "cap", "threads"}
    return True if known <= both and "?" not in (pa["bf16"], pb["bf16"]) else None


def other_devices(a, b) -> str:
    """'on different devices (...)' where two runs' `device` tags show different devices, else ''."""
    devices = [r.tags.get("device") for r in (a, b)]
    if None in devices or same_device(*devices) is not False:
        return ""
    return f"on different devices (`{devices[0]}` for {a.label}, `{devices[1]}` for {b.label})"


def repeat_sentence(first: Pretrain, again: Pretrain, marked: Pretrain | None = None) -> str:
    """Two pre-trainings of the same settings: the first imported from an export, which
    carries no weights, so the Magnitude runs made since trained it again to prune from.
    The two sets of runs prune the same weights only if the two repeat each other; where
    they do not, the runs of `marked` (the one fewer runs prune: Study.minor_pretrains;
    default the repeat) carry the mark."""
    name, other = ("the first", "the repeat") if marked is first else ("the repeat", "the first")
    minor = f"{name}, which fewer cells prune," if marked is first else name
    text = (f"Pre-trained twice: {again.label} has every setting of {first.label} (tag `pretrain_hash`), which "
            f"{'was imported from an export that carries no weights' if first.tags.get(IMPORTED_FROM) else 'finished before it'}"
            f", so the runs made since pre-trained again to have weights to prune. ")
    digests = {r.tags.get(WEIGHTS_DIGEST) for r in (first, again)}
    if None not in digests:
        return text + ("They hold the same weights, to the bit (tag `weights_sha256`), so the Magnitude runs of both "
                       "prune the same weights and compare like for like." if len(digests) == 1 else
                       f"Their weights differ (tag `weights_sha256`): the Magnitude runs of {minor} are marked "
                       f"{PRETRAINED_AGAIN}.")
    arithmetic = {r.setting("precision") for r in (first, again)}
    if len(arithmetic) > 1:  # `precision: auto` is in the hash; what it resolved to is the tag
        return text + (f"They trained in different precisions ({first.setting('precision')}, then "
                       f"{again.setting('precision')}: `precision: auto` takes what each machine has natively), so "
                       "they are two pre-trainings, not one repeated: the Magnitude runs of the two prune "
                       "different weights, and differences between them include the change of arithmetic.")
    gap = history_gap(first, again)
    if not gap:
        return text + "Their per-epoch curves were not both logged, so whether they repeat each other is unknown."
    epochs = max(n for n, _ in gap.values())
    if same_training(first, again):
        return text + (f"They repeat each other exactly ({join_words(list(gap))} equal at all {epochs} epochs), so "
                       "the Magnitude runs of both prune the same weights and compare like for like.")
    if all(v == 0 for _, v in gap.values()):
        return text + (f"Their curves are equal at the {epochs} epochs both logged, but one logged more epochs than "
                       f"the other, so they may end with other weights: the Magnitude runs of {minor} are marked "
                       f"{PRETRAINED_AGAIN}.")
    devices = other_devices(first, again)
    text += (f"They differ, {gap_words(gap)} over {plural(epochs, 'epoch')}"
             + (f", having trained {devices}, whose kernels need not round alike" if devices else "") + ": ")
    return text + (f"the Magnitude runs of {name} (marked {PRETRAINED_AGAIN}"
                   + (": fewer cells prune it" if marked is first else "") + ") prune other "
                   f"weights than those of {other}, so a difference between the two includes the change of "
                   "pre-training.")


def pretrain_text(s: Study) -> list[str]:
    """The sentences of the pre-training section (its figure aside)."""
    M = model_label(s.main)
    out = []
    earlier = {pre.id: first for pre, first in s.repeats()}
    for pre in s.pretrains:
        out += [pretrain_sentence(pre, len(s.pretrains) == 1), ""]
        if pre.id in earlier:
            minor = {m.id for m, _ in s.minor_pretrains()}
            marked = next((p for p in (earlier[pre.id], pre) if p.id in minor), None)
            out += [repeat_sentence(earlier[pre.id], pre, marked), ""]
        out += [x for twin in s.twins(pre) if (line := twin_sentence(pre, twin)) for x in (line, "")]
    if s.pretrain_missing:
        ids = ", ".join(f"`{i}`" for i in s.pretrain_missing)
        out += [f"Runs of {M} name pre-training {'runs' if len(s.pretrain_missing) > 1 else 'run'} {ids} (tag "
                "`pretrain_run`) that the experiment does not hold as FINISHED pre-training runs.", ""]
    if not out:
        out = [f"No run of {M} starts from a pre-training run (no run has a `pretrain_run` tag).", ""]
    return out
