"""Step 2: the report's tables (markdown), drawn from the study's records only."""
from __future__ import annotations

from collections import Counter

from prunetrack.report.records import (
    ACCURACY,
    FLOPS,
    NO_RUN,
    NOT_LOGGED,
    OTHER_PRECISION,
    OTHER_TIMING,
    PRETRAINED_AGAIN,
    SHARED,
    TIMED_TEST_TIME,
    Metric,
    Stat,
    Study,
    grouped,
    join_words,
    model_label,
    names,
    plural,
    pruner_label,
    round_range,
)


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def footnote(rows: list[list[str]], marks: list[tuple[str, str]] = ()) -> list[str]:
    """The legend of the missing marks, then each (mark, note) of `marks` whose mark is in a cell."""
    cells = {c for row in rows for c in row}
    notes = []
    if NO_RUN in cells:
        notes.append(f"{NO_RUN} no finished run of this cell")
    if NOT_LOGGED in cells:
        notes.append(f"{NOT_LOGGED} the cell's runs did not log this measurement")
    out = [""]
    if notes:
        out += [f"<sub>{'; '.join(notes)}; see [Missing cells](#missing-cells).</sub>", ""]
    shown = [f"<sub>{note}</sub>" for mark, note in marks if any(mark in c for c in cells)]
    return out + (shown + [""] if shown else [])


def precision_note(s: Study) -> tuple[str, str] | None:
    """The footnote of the double dagger: which accuracy cells trained in another precision."""
    others = [r for r in s.runs if s.other_precisions([r])]
    if not others:
        return None
    used = join_words([f"{p} ({plural(len(rs), 'run')}: {names(rs)})"
                       for p, rs in sorted(grouped(others, lambda r: r.setting("precision")).items())])
    return OTHER_PRECISION, (f"{OTHER_PRECISION} trained in another precision than the study's {s.precision}: {used}. "
                             "A precision changes the arithmetic of training, so an accuracy difference between "
                             f"a {OTHER_PRECISION} cell and the others includes that change, beyond what the "
                             "findings' noise threshold covers (see Settings).")


def pretrain_note(s: Study) -> tuple[str, str] | None:
    """The footnote of the pilcrow: which cells prune another version of a repeated
    pre-training than the other cells of their pruner."""
    again = s.pretrained_again(s.runs)
    if not again:
        return None
    pairs = s.minor_pretrains()
    mains = list(dict.fromkeys(main.label for _, main in pairs))
    return PRETRAINED_AGAIN, (
        f"{PRETRAINED_AGAIN} pruned from another pre-training than the other cells of its pruner "
        f"({join_words([minor.label for minor, _ in pairs])}, where the others prune {join_words(mains)}, with every "
        f"setting alike; {plural(len(again), 'run')}: {names(again)}): the pre-training was repeated where the first "
        "one's weights were not at hand (an export carries none). The two do not repeat each other exactly, so "
        "these cells prune other weights; the Pre-training section says how far the two differ.")


def timing_setup(r) -> str:
    """Where and in what precision the controlled timing pass timed a run."""
    return f"device {r.tags.get('timing.device', '?')}, precision {r.tags.get('timing.precision', '?')}"


def timed_elsewhere(s: Study, runs: list) -> list:
    """The runs among `runs` timed on another device or in another precision than most of the
    main model's timed runs: their times measure the machine as much as the network."""
    timed = [r for r in s.runs if r.model == s.main and TIMED_TEST_TIME.key in r.metrics]
    usual = Counter(timing_setup(r) for r in timed).most_common(1)
    return [r for r in runs if TIMED_TEST_TIME.key in r.metrics and usual and timing_setup(r) != usual[0][0]]


def timing_note(s: Study) -> tuple[str, str] | None:
    """The footnote of the section mark: which cells' testing times came from another setup."""
    others = timed_elsewhere(s, [r for r in s.runs if r.model == s.main])
    if not others:
        return None
    setups = join_words([f"{setup} ({names(rs)})" for setup, rs in grouped(others, timing_setup).items()])
    return OTHER_TIMING, (f"{OTHER_TIMING} timed on another device or in another precision than most cells: {setups}. "
                          "Such a time measures the machine as much as the network; `study.sh retime` (or `prunetrack "
                          "time --precision auto` without `--untimed`) times every cell in one pass and one precision.")


def shared_note(s: Study, model: str) -> str | None:
    """The footnote of the dagger: which pruners show the one dense run at 1x, and why
    Magnitude's 1x is not among them."""
    runs = s.shared_runs(model)
    if not runs:
        return None
    labels = [pruner_label(p) for p in s.pruners if s.is_shared(model, p, 1.0)]
    which = (f"one run (run {runs[0].label})" if len(runs) == 1 else
             f"the same {len(runs)} runs, one per configuration (runs {', '.join(r.label for r in runs)})")
    text = (f"{SHARED} the dense network at 1x: nothing is pruned at 1x, so {join_words(labels)} share "
            f"{which}")
    if "mag" in s.pruners:
        mag = s.cell(model, "mag", 1.0)
        pretrained = any(r.pretrained for r in s.runs if r.model == model and r.pruner == "mag")
        if mag and all(r.pretrained for r in mag):
            text += f"; Magnitude's 1x starts from its pre-trained weights and is its own run{'s' * (len(mag) > 1)}"
        elif mag:
            text += "; Magnitude's 1x is its own run"
        elif pretrained:
            text += "; Magnitude's 1x starts from pre-trained weights, so it is not shared (no run of it yet)"
    if len(s.models) > 1 and model != s.main:
        text = f"{model_label(model)}: {text}"
    return text + "."


def spread(s: Study, model: str, pruner: str, c: float) -> str:
    """The min-max of the controlled timing rounds over a cell's runs."""
    found = round_range(s.cell(model, pruner, c), TIMED_TEST_TIME.key)
    return f" [{s.time_metric.fmt(found[0])}–{s.time_metric.fmt(found[1])}]" if found else ""


def value(s: Study, model: str, pruner: str, c: float, metric: Metric) -> str:
    st = s.stat(model, pruner, c, metric.key)
    if st is None:
        return s.mark(model, pruner, c)
    text = st.fmt(metric.fmt)
    if metric.key == TIMED_TEST_TIME.key:
        text += spread(s, model, pruner, c) + (f" {OTHER_TIMING}" if timed_elsewhere(s, s.cell(model, pruner, c)) else "")
    if metric.key == ACCURACY.key and s.other_precisions(s.cell(model, pruner, c)):
        text += f" {OTHER_PRECISION}"
    if metric.key in (ACCURACY.key, FLOPS.key) and s.pretrained_again(s.cell(model, pruner, c)):
        text += f" {PRETRAINED_AGAIN}"  # other weights ranked: other masks, other accuracy
    return text + (f" {SHARED}" if s.is_shared(model, pruner, c) else "")


def metric_row(s: Study, model: str, c: float, metric: Metric) -> list[str]:
    return [value(s, model, p, c, metric) for p in s.pruners]


def timing_conditions(s: Study) -> str:
    """How the controlled timing pass measured, from the tags it left on the runs."""
    runs = [r for r in s.runs if r.model == s.main and TIMED_TEST_TIME.key in r.metrics]

    def seen(key: str) -> str:
        values = list(dict.fromkeys(r.tags[f"timing.{key}"] for r in runs if f"timing.{key}" in r.tags))
        return " / ".join(values) if values else "(not logged)"

    passes = Counter(r.tags.get("timing.when") for r in runs)
    counted = [r for r in runs if r.tags.get("timing.masks") == "layer counts"]
    masks = ("each network rebuilt from its run's masks" if not counted else
             f"each network rebuilt from its run's masks, or, for {plural(len(counted), 'run')} imported without them "
             "(exports carry no masks), under masks with its logged number of surviving weights in each layer, "
             "placed at random (dense kernels take as long whichever weights are zero)")
    text = (f"median of {plural(seen('rounds'), 'round')}, cells interleaved, {masks}, batch {seen('batch_size')}, "
            f"{plural(seen('threads'), 'thread')}, device {seen('device')}, precision {seen('precision')}; ")
    if len(passes) == 1:
        return text + f"load average {seen('loadavg')} when it started ({seen('when')})"
    parts = []
    for when, n in sorted(passes.items(), key=lambda kv: str(kv[0])):
        load = next(r.tags.get("timing.loadavg", "?") for r in runs if r.tags.get("timing.when") == when)
        parts.append(f"{plural(n, 'run')} at {when} (load average {load})")
    return text + (f"in {len(passes)} passes, each interleaving only its own runs: {'; '.join(parts)}. Runs of "
                   "different passes compare less well than runs of one pass")


def time_caption(s: Study) -> tuple[str, str, list[str]]:
    """What Table 3 says it holds, how it was measured, and the note under it."""
    if s.time_metric.key == TIMED_TEST_TIME.key:
        return (f"Testing time ({s.time_metric.unit}, whole test set; the median of a controlled timing pass, [min–max] over its "
                "rounds beside it) of", f" Measured: {timing_conditions(s)}.", [])
    return (f"Testing time ({s.time_metric.unit}, whole test set, median over repeats) of", "",
            [f"These are the jobs' own `test_time`, measured while training shared the machine: they are "
             f"not comparable across cells. No run of {model_label(s.main)} has `{TIMED_TEST_TIME.key}` "
             "from a controlled timing pass.", ""])


def layer_tables(s: Study, header: list[str]) -> list[str]:
    """Tables 5 and 6: per layer at the focus ratio."""
    M, F = model_label(s.main), s.opts.focus
    density = {p: s.layer_stats(p, "density") for p in s.pruners}
    flops = {p: s.layer_stats(p, "flops_effective") for p in s.pruners}
    dense_flops = next((f for p in s.pruners if (f := s.layer_stats(p, "flops_dense"))), None)
    reference = next((d[0] for d in density.values() if d), None)
    if reference is None:
        return [f"**Table 5.** Per-layer sparsity of {M} at {F:g}x: no run of this model at {F:g}x "
                "logged layers.json.", ""]

    def layer_cell(found, p, layer, fmt):
        if found and layer in found[1]:
            return found[1][layer].fmt(fmt)
        return s.mark(s.main, p, F)

    # Sparsity is what the table states (share pruned, %); layers.json logs density.
    sparsity = {p: d and (d[0], {k: Stat([100 * (1 - v) for v in st.values]) for k, st in d[1].items()})
                for p, d in density.items()}
    rows5, rows6 = [], []
    for row in reference:
        layer = row["layer"]
        rows5.append([f"`{layer}`", str(row.get("shape", "")), f"{int(row['params']):,}"]
                     + [layer_cell(sparsity[p], p, layer, lambda x: f"{x:.2f}") for p in s.pruners])
        dense = (f"{dense_flops[1][layer].mean / 1e6:,.2f}" if dense_flops and layer in dense_flops[1]
                 else NOT_LOGGED)
        rows6.append([f"`{layer}`", dense]
                     + [layer_cell(flops[p], p, layer, lambda x: f"{x / 1e6:,.2f}") for p in s.pruners])
    out = [f"**Table 5.** Per-layer sparsity of {M} at {F:g}x: % of each layer's weights pruned "
           "(from each run's layers.json), one column per pruner.", ""]
    out += md_table(["Layer", "Shape", "Params"] + header[1:], rows5) + footnote(rows5)
    out += [f"**Table 6.** Per-layer FLOPs of {M} at {F:g}x (millions; dense, then effective for "
            "each pruner).", ""]
    out += md_table(["Layer", "Dense"] + header[1:], rows6) + footnote(rows6)
    return out


def tables_section(s: Study) -> list[str]:
    M, F = model_label(s.main), s.opts.focus
    header = ["Model"] + [pruner_label(p) for p in s.pruners]
    out = []
    rows = [[model_label(m)] + metric_row(s, m, F, ACCURACY) for m in s.models]
    precision = [n for n in (precision_note(s), pretrain_note(s)) if n]
    notes = [(SHARED, n) for m in s.models if (n := shared_note(s, m))] if F == 1.0 else []
    out += [f"**Table 1.** Test accuracy (top-1, %) at {F:g}x compression, one row per model, one "
            f"column per pruner.", ""] + md_table(header, rows) + footnote(rows, precision + notes)
    time_what, time_how, time_note = time_caption(s)
    main_note = precision + [(SHARED, n) for n in (shared_note(s, s.main),) if n]
    for n, metric, what in ((2, ACCURACY, "Test accuracy (top-1, %) of"),
                            (3, s.time_metric, time_what),
                            (4, FLOPS, "Effective FLOPs (millions, 2 x MACs over the weights that survive) of")):
        rows = [[f"{c:g}x"] + metric_row(s, s.main, c, metric) for c in s.compressions]
        how = time_how if n == 3 else ""
        out += [f"**Table {n}.** {what} {M} against compression, one column per pruner.{how}", ""]
        marks = main_note + [n for n in (timing_note(s),) if n and metric is s.time_metric]
        out += md_table(["Compression"] + header[1:], rows) + footnote(rows, marks)
        if n == 3:
            out += time_note
    out += layer_tables(s, header)
    return ["## Tables", ""] + out
