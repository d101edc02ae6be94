"""Step 5: the report as a whole: the settings and missing-cells sections, the markdown
assembled from the tables, figures and findings, the files written, and the report run."""
from __future__ import annotations

import datetime
import os
import re
import shlex
from collections import Counter

from mlflow.tracking import MlflowClient

from prunetrack import config, tracking
from prunetrack.report import budget, figures, findings, paper, tables
from prunetrack.report.collect import collect
from prunetrack.report.records import (
    NO_RUN,
    NOT_LOGGED,
    ReportOptions,
    Run,
    Study,
    cell_name,
    grouped,
    join_words,
    model_label,
    names,
    norm,
    plural,
    pruner_label,
    pruner_name,
)
from prunetrack.tracking import KIND_TAG

SETTINGS = [
    ("dataset", "Dataset"), ("dataset_source", "Data copy"), ("dataset_sha256", "Dataset SHA-256"),
    ("train_examples", "Training examples"), ("test_examples", "Test examples"), ("optimizer", "Optimizer"),
    ("lr", "Learning rate"), ("weight_decay", "Weight decay"), ("lr_drops", "LR drops (epochs)"),
    ("batch_size", "Batch size (train)"), ("test_batch_size", "Batch size (test)"),
    ("pre_epochs", "Pre-training epochs (cap)"), ("pre_patience", "Pre-training patience (epochs)"),
    ("post_epochs", "Training epochs"), ("prune_per_class", "Pruning data (examples per class)"),
    ("prune_batch_size", "Batch size (pruning)"), ("scope", "Mask scope"), ("schedule", "Pruning schedule"),
    ("prune_mode", "Scoring mode"),
    ("iterations", "Pruning iterations"), ("device", "Device"), ("precision", "Precision"),
    ("torch_version", "PyTorch"), ("mlflow_version", "MLflow"), ("prunetrack_version", "prunetrack"),
    ("git_commit", "Git commit"),
]
PRETRAIN_SETTINGS = ("pre_epochs", "pre_patience")
# What ran the protocol, not the protocol: runs of a study resumed over weeks, on whatever
# machine each sitting had, differ here without being different experiments, so these are
# listed but not flagged as a protocol change. (Precision, which a machine decides under
# `auto`, changes the arithmetic: it stays a setting.)
PROVENANCE = ("device", "torch_version", "mlflow_version", "prunetrack_version", "git_commit")
MAX_NAMED_VERSIONS = 3  # a provenance setting with more values lists counts, not runs


def protocol(s: Study) -> str:
    """The protocol in one paragraph, each value the most common among the runs."""
    runs = s.runs
    v = lambda key, group=None: s.common(key, group) or "(not logged)"
    synflow = [r for r in runs if r.pruner == "synflow"]
    pre = [r for r in runs if r.pretrained]
    parts = [f"optimizer {v('optimizer')}", f"lr {v('lr')}", f"batch size {v('batch_size')}",
             f"weight decay {v('weight_decay')}", f"lr drops {s.common('lr_drops') or 'none'}",
             f"{plural(v('post_epochs'), 'training epoch')} after pruning (`post_epochs`)",
             f"pruning data {v('prune_per_class')} examples per class", f"{v('scope')} scope"]
    if synflow:
        parts.append(f"SynFlow {v('iterations', synflow)} iterations")
    parts += [f"precision {v('precision')}", f"data: {v('dataset_source')}"]
    text = "**Protocol** (the most common value among the runs; ⚠ below marks any that differ): " + "; ".join(parts)
    if pre:
        who = join_words(sorted({pruner_name(r.pruner) for r in pre}))
        text += (f". Pre-training ({who}): at most {plural(v('pre_epochs', pre), 'epoch')} (`pre_epochs`, a cap), "
                 f"stopping once the test loss has not improved for {plural(v('pre_patience', pre), 'epoch')} "
                 "(`pre_patience`; 0: never)")
    else:
        text += ". No run starts from a pre-training"
    return text + "."


def short_commit(value: str) -> str:
    """A commit as `git log --abbrev=12` shows it, its `-dirty` mark kept."""
    sha, dirty, _ = value.partition("-dirty")
    if len(sha) == 40 and all(ch in "0123456789abcdef" for ch in sha):
        return sha[:12] + dirty
    return value


def settings_section(s: Study) -> list[str]:
    """The protocol as the runs logged it, one line per setting; a setting with several
    values among the runs is flagged with the runs holding each."""
    runs = s.runs
    lines = ["## Settings", "",
             f"Read from the {plural(len(runs), 'finished prune run')} of experiment `{s.opts.experiment}` "
             f"(id {s.experiment_id}) at `{s.tracking_uri}`.", "", protocol(s), ""]
    models = Counter(r.model for r in runs)
    lines.append("- **Models**: " + ", ".join(f"{model_label(m)} ({plural(n, 'run')})" for m, n in models.items()))
    flagged, versions = 0, []

    def describe(key: str, title: str, group: list[Run], suffix: str = "") -> None:
        nonlocal flagged
        values = grouped(group, lambda r: "(not logged)" if (v := r.setting(key)) is None else v or "(none)")
        if len(values) == 1:
            lines.append(f"- **{title}**{suffix}: `{next(iter(values))}`")
            return
        ordered = sorted(values.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))  # most runs first
        if key in PROVENANCE:
            # Not a protocol setting: a study run in pieces collects many commits, and naming
            # every run of each would bury the protocol; past a few values, counts only (each
            # run's tag has its own).
            short = short_commit if key == "git_commit" else (lambda v: v)
            few = len(ordered) <= MAX_NAMED_VERSIONS
            parts = [f"`{short(v)}` in {plural(len(rs), 'run')}" + (f" ({names(rs)})" if few else "")
                     for v, rs in ordered]
            versions.append(title)
            lines.append(f"- **{title}**{suffix}: differs between runs" + ("" if few else f" ({len(ordered)} values, "
                         f"each run's `{key}` tag names its own)") + ": " + "; ".join(parts))
            return
        parts = [f"`{v}` in {plural(len(rs), 'run')} ({names(rs)})" for v, rs in ordered]
        flagged += 1
        lines.append(f"- **{title}**{suffix}: ⚠ differs between runs: " + "; ".join(parts))

    pretrained = [r for r in runs if r.pretrained]
    for key, title in SETTINGS:
        if key == "iterations":  # differs by design between pruners (SynFlow: 100 rounds)
            for p in sorted({r.pruner for r in runs}):
                describe(key, title, [r for r in runs if r.pruner == p], f" ({pruner_label(p)})")
        elif key in PRETRAIN_SETTINGS and pretrained:  # only the runs that start from a pre-training have one
            who = join_words(sorted({pruner_label(r.pruner) for r in pretrained}))
            describe(key, title, pretrained, f" (runs that start from a pre-training: {who})")
            rest = [r for r in runs if not r.pretrained]
            if rest:
                describe(key, title, rest, " (the other runs)")
        else:
            describe(key, title, runs)
    lines.append("")
    if flagged:
        lines += [f"⚠ {flagged} setting(s) differ between runs: the runs above are not one protocol, "
                  "compare the flagged cells with care.", ""]
    if versions:
        agree = "every protocol setting above agrees" if not flagged else "the ⚠ settings aside, the protocol agrees"
        git = "; `git log` between the commits shows what changed" if "Git commit" in versions else ""
        software = [title for title in versions if title != "Device"]
        made = ([f"by more than one software version ({join_words(software)})"] if software else []) + \
            (["on more than one device"] if "Device" in versions else [])
        which = {1: "a version is not" if software else "a device is not"}.get(len(made), "neither is")
        lines += [f"The runs were made {join_words(made)}: listed, not flagged, since {which} a protocol setting; "
                  f"{agree}{git}.", ""]
    for why, rs in s.excluded.items():
        lines.append(f"- Not in the tables: {plural(len(rs), 'run')} with {why}: " + ", ".join(r.label for r in rs[:6])
                     + (" …" if len(rs) > 6 else ""))
    if s.skipped:
        lines.append("- Ignored (not FINISHED): " + ", ".join(f"{n} {st}" for st, n in s.skipped.items()))
    return lines + [""]


def command_for(s: Study, model: str, pruner: str, compression: float) -> str:
    """The `mlflow run` command that would produce a cell under the protocol of the runs
    found: every MLproject parameter whose usual value is not its default. The usual value
    is the pruner's own where it has runs, since some settings are the pruner's (SynFlow's
    rounds, Magnitude's pre-training), and the study's otherwise."""
    params = {"model": model, "pruner": pruner, "compression": f"{compression:g}", "dataset": s.dataset}
    own = [r for r in s.runs if r.pruner == pruner] or None  # None: all runs
    for f in config.fields():
        if not f.metadata.get("mlproject") or f.name in params or f.name == "device":
            continue
        group = own if f.name in ("iterations", *PRETRAIN_SETTINGS) else s.runs
        value = s.common(f.name, group, tag_first=False)  # the param: "auto" stays auto
        if value is None:
            continue
        if f.name == "iterations" and value in ("0", norm(config.default_iterations(pruner))):
            continue
        if value != norm(f.default):
            params[f.name] = value
    args = " ".join(f"-P {k}={shlex.quote(str(v))}" for k, v in params.items())
    return f"mlflow run . --env-manager local -e prune --experiment-name {shlex.quote(s.opts.experiment)} {args}"


def missing_section(s: Study) -> list[str]:
    md = ["## Missing cells", ""]
    if not s.missing:
        return md + ["Every cell of every table has a finished run with its measurements.", ""]
    md += ["Each line is a cell shown as a missing mark above and the command that would produce it "
           "(the protocol of the runs found; add `-P seed=N` for more seeds).", ""]
    order = lambda key: (*s.position(key[0], key[1]), key[2])  # (model, pruner, compression)
    for (model, pruner, c), why in sorted(s.missing.items(), key=lambda kv: order(kv[0])):
        md += [f"- {cell_name(model, pruner, c)}: {'; '.join(sorted(why))}",
               f"  `{command_for(s, model, pruner, c)}`"]
    return md + [""]


class Numbered:
    """Figures numbered in the order they appear, across sections."""

    def __init__(self):
        self.n = 0

    def add(self, file: str, caption: str) -> list[str]:
        if not file:
            return [caption, ""]
        self.n += 1
        return [f"![Figure {self.n}]({file})", "", f"**Figure {self.n}.** {caption}", ""]


def pretrain_section(s: Study, out: str, numbered: Numbered) -> list[str]:
    md = ["## Pre-training (Magnitude)", ""]
    file = "pretrain_curves.png"
    if s.pretrains and figures.figure_pretrain(s.pretrains, os.path.join(out, file)):
        md += numbered.add(file, "Pre-training of the weights Magnitude prunes: train (solid) and test (dashed) "
                                 "loss per epoch, and test top-1 per epoch; dotted: the epoch whose weights "
                                 "are pruned.")
    return md + findings.pretrain_text(s)


def coverage(s: Study) -> str:
    """How far the study is: per model, the cells of tables 1-4 that have a finished run."""
    cells = {(m, p, s.opts.focus) for m in s.models for p in s.pruners}
    cells |= {(s.main, p, c) for p in s.pruners for c in s.compressions}
    parts, absent = [], 0
    for m in s.models:
        mine = [k for k in cells if k[0] == m]
        missing = sum("no finished run" in s.missing.get(k, ()) for k in mine)
        parts.append(f"{model_label(m)} {len(mine) - missing} of {len(mine)}")
        absent += missing
    return ("**Coverage**: the cells of Tables 1-4 with a finished run: " + ", ".join(parts)
            + ("; the others are listed, each with the command that fills it, under [Missing cells](#missing-cells)."
               if absent else "."))


def render(s: Study, out: str) -> str:
    """The report's markdown; draws its figures into `out`."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(s.dataset, s.dataset)
    md = [f"# Pruning at initialization: {join_words([model_label(m) for m in s.models])} on {data}", "",
          f"Experiment `{s.opts.experiment}`. "
          f"Generated {now} by `prunetrack report` from the MLflow tracking server; every number below "
          f"is read from the runs. Cells with several runs (seeds) show mean ± std (n); {NO_RUN} marks "
          f"a cell without a finished run, {NOT_LOGGED} one whose runs did not log the measurement.", ""]
    md += [coverage(s), ""]
    md += settings_section(s)
    md += tables.tables_section(s)
    numbered = Numbered()
    md += ["## Figures", ""]
    for file, caption in figures.draw(s, out):
        md += numbered.add(file, caption)
    md += pretrain_section(s, out, numbered)
    md += budget.budget_section(s, out, numbered)
    md += ["## Findings", ""] + findings.findings(s) + [""]
    md += paper.synflow_paper_section(s)
    md += missing_section(s)
    return "\n".join(md).rstrip() + "\n"


PAGE_STYLE = """body{font-family:system-ui,sans-serif;max-width:72em;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:0 .2em}
sub{font-size:.8em}"""


def html_page(text: str, folder: str, title: str) -> str:
    """REPORT.md as one self-contained HTML page, its figures inlined as data URIs:
    MLflow's artifact viewer shows HTML, but not markdown with images beside it."""
    import base64
    import html

    import markdown

    body = markdown.markdown(text, extensions=["tables", "toc", "sane_lists"])  # toc: ids for #links

    def inline(m: re.Match) -> str:
        path = os.path.join(folder, m.group(1))
        if not os.path.isfile(path):
            return m.group(0)
        with open(path, "rb") as fh:
            return f'src="data:image/png;base64,{base64.b64encode(fh.read()).decode()}"'

    body = re.sub(r'src="([^"/:]+\.png)"', inline, body)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{PAGE_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n")


def log_report_run(experiment: str, name: str, folder: str, page: str) -> str:
    """Log the report's files and its HTML page (`page`) to a report run (the one `mlflow
    run` created, if any), tagged so later reports skip it."""
    with tracking.job_run(experiment, f"report-{name}") as run:
        tracking.log_tags({KIND_TAG: "report", "report.experiment": experiment, "report.name": name})
        tracking.log_folder(folder)
        tracking.log_text(page, "REPORT.html")
        tracking.describe(f"The report `{name}` of experiment `{experiment}`: `REPORT.html` (one page, figures "
                          f"inline) and `REPORT.md` with its figures, as written to {folder}.")
        here = MlflowClient().get_experiment(run.info.experiment_id).name
        if here != experiment:  # `mlflow run` without --experiment-name logs to its own experiment
            print(f"report run {run.info.run_id} is in experiment {here!r}; pass --experiment-name "
                  f"{experiment} to `mlflow run` to keep it beside the runs it reports", flush=True)
        return run.info.run_id


def build_report(opts: ReportOptions) -> str:
    """Write the report and its figures; returns the path of REPORT.md."""
    study = collect(opts)
    name = opts.name or re.sub(r"[^A-Za-z0-9._-]+", "-", opts.experiment).strip("-") or "report"
    out = os.path.join(opts.output_dir, name)
    os.makedirs(out, exist_ok=True)
    for old in os.listdir(out):  # a re-run must not leave figures of runs since removed
        if old.endswith(".png") or old == "REPORT.md":
            os.remove(os.path.join(out, old))
    text = render(study, out)
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as fh:
        fh.write(text)
    log_report_run(opts.experiment, name, out, html_page(text, out, text.splitlines()[0].lstrip("# ")))
    return path
