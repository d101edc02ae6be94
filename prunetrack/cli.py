"""The command line: `prunetrack prune|sweep|report|export|import` (Click), also what MLproject calls.

`prune`'s options are generated from the configuration dataclasses
(`prunetrack.config`), so `--help` always lists every hyperparameter with its default.
Only click and `prunetrack.config` are imported here: each command imports what it
runs (torch, mlflow) when it runs, so `--help` answers at once.
"""
from __future__ import annotations

import os
import re
import sys

import click

from prunetrack import config
from prunetrack.progress import plural


def _option(f):
    meta = f.metadata
    flag = "--" + f.name.replace("_", "-")
    kwargs = dict(default=f.default, show_default=True, help=meta["help"])
    if meta.get("choices"):
        # Choices are checked in JobConfig.validate so the message lists every valid
        # name; the Click choice below gives shell users the same list in --help.
        kwargs["type"] = click.Choice(config.choices(meta["choices"]))
    elif f.type in ("bool", bool):
        kwargs["type"] = click.BOOL  # takes a value (true/false) so MLproject can pass one
    else:
        kwargs["type"] = {"int": int, "float": float, "str": str}.get(f.type, f.type)
    return click.option(flag, f.name, **kwargs)


class Duration(click.ParamType):
    """A length of time such as 2h30m, 90m, 45s or 1h (units h, m, s), as seconds; empty:
    none (what MLproject passes for an unset time limit)."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        if not value.strip():
            return None
        m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*", value)
        if not m or not any(m.groups()):
            self.fail(f"{value!r} is not a duration: give hours, minutes and/or seconds, such as 2h30m, 90m or 45s",
                      param, ctx)
        h, mins, sec = (float(g or 0) for g in m.groups())
        seconds = 3600 * h + 60 * mins + sec
        if seconds <= 0:
            self.fail(f"{value!r} is no time at all: give a positive duration, such as 2h30m", param, ctx)
        return seconds


def time_limit_option(what: str):
    return click.option(
        "--time-limit", type=Duration(), default=None,
        help=f"Stop {what} by this long from now (such as 2h30m, 90m): an epoch that would not end in time is not "
             "started, the run ends KILLED at its last checkpoint and the command exits with 75; running it again "
             "resumes.")


def _exit_time_up() -> None:
    """The time limit stopped the job at a checkpoint (the job said so): exit 75, try again
    later, rather than Click's "Aborted!" and 1."""
    from prunetrack import interrupts

    sys.exit(interrupts.EXIT_TIME_UP)


def config_options(fn):
    for f in reversed(config.fields()):
        fn = _option(f)(fn)
    return fn


@click.group()
@click.version_option(package_name="prunetrack")
def cli():
    """Prune networks at initialization and track every run in MLflow."""


@cli.command()
@config_options
@time_limit_option("the job")
def prune(time_limit, **values):
    """Prune a network at initialization, train it, and log the run to MLflow.

    \b
    Example (a CPU smoke run in about a minute):
      prunetrack prune --dataset synthetic --model resnet20 --pruner mag --compression 10 --post-epochs 2
    """
    from prunetrack import interrupts
    from prunetrack.checkpoint import CheckpointBusy, NotResumable
    from prunetrack.job import run_job
    from prunetrack.store import TrackingError

    cfg, device = _prepared(values)
    try:
        with interrupts.time_limited(time_limit):
            run_job(cfg, device)
    except (CheckpointBusy, NotResumable, TrackingError) as e:
        raise click.ClickException(str(e)) from None
    except interrupts.TimeUp:
        _exit_time_up()


@cli.command()
@config_options
@time_limit_option("the pre-training")
def pretrain(time_limit, **values):
    """Pre-train the network that `prune --pre-epochs N` (with the same model, data, seed and
    training settings) starts from, as a run of its own, unless it exists already.
    Pruning options are accepted and ignored. Sweeps run this before their cells.

    \b
    Example:
      prunetrack pretrain --model vgg16 --pre-epochs 200 --pre-patience 5
    """
    from prunetrack import interrupts
    from prunetrack import pretrain as pretraining
    from prunetrack.checkpoint import NotResumable
    from prunetrack.store import TrackingError

    cfg, device = _prepared(values)
    if not cfg.train.pre_epochs:
        raise click.BadParameter("pre_epochs is 0: nothing to pre-train; pass --pre-epochs N")
    try:
        with interrupts.time_limited(time_limit):
            pretraining.obtain(cfg, device)
    except (NotResumable, TrackingError) as e:
        raise click.ClickException(str(e)) from None
    except interrupts.TimeUp:
        _exit_time_up()


def _prepared(values: dict):
    """The configuration of `prune`'s options, validated and resolved by `job.prepare`
    (here rather than inside run_job, so that a bad option is a usage error), and its
    device; a usage error names what is wrong."""
    from prunetrack import job

    try:
        cfg = config.JobConfig.from_flat(values)
        return cfg, job.prepare(cfg)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _csv(kind, what: str):
    """A Click callback turning 'a,b,c' into a list (None when empty: use the defaults)."""
    def parse(ctx, param, value):
        items = [v.strip() for v in (value or "").split(",") if v.strip()]
        try:
            out = [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {what}, got {value!r}") from None
        return out or None
    return parse


def _compressions(ctx, param, value):
    out = _csv(float, "compression ratios such as 1,2,5,10")(ctx, param, value)
    if out and min(out) < 1:
        raise click.BadParameter(f"compression ratios must be >= 1, got {value!r}")
    return out


@cli.command()
@click.option("--experiment", required=True, help="MLflow experiment whose prune runs the report reads.")
@click.option("--name", default="", help="Report name: the folder under --output-dir (default: the experiment).")
@click.option("--output-dir", default="reports", show_default=True, help="Where reports/<name>/ is written.")
@click.option("--models", default="", callback=_csv(str, "model names"),
              help="Models, comma-separated; the first with runs fills tables 2-6 "
                   "(default: the VGG16 the runs used, vgg16_bn or vgg16 (vgg16_bn if none), then resnet50 "
                   "and any other found).")
@click.option("--compressions", default="", callback=_compressions,
              help="Compression ratios, comma-separated (default: 1,2,5,10,15,20 and any other found).")
@click.option("--pruners", default="", callback=_csv(str, "pruner names"),
              help="Pruners (table columns), comma-separated (default: rand,mag,snip,grasp,synflow "
                   "and any other found).")
@click.option("--dataset", default="", help="Dataset of the runs to report (default: the only one found).")
def report(experiment, name, output_dir, models, compressions, pruners, dataset):
    """Write the study's report from an experiment's runs: reports/<name>/REPORT.md,
    its figures, and the same files as artifacts of a report run.

    \b
    Example:
      prunetrack report --experiment study --models vgg16,resnet50
    """
    from prunetrack.report import ReportError, ReportOptions, build_report

    opts = ReportOptions(experiment=experiment, name=name, output_dir=output_dir, models=models,
                         compressions=compressions, pruners=pruners, dataset=dataset)
    try:
        path = build_report(opts)
    except ReportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"report written to {path}")


@cli.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option("--parallel", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells run at a time by the local executor (each pinned to a GPU when there are GPUs).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: subprocesses of this command; ray: one Ray task per cell (pip install 'prunetrack[ray]').")
@click.option("--ray-address", default=None,
              help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray instance).")
@click.option("--dry-run", is_flag=True, help="List the cells, which would be skipped and their estimated times; run nothing. "
                   "With --time-limit: which cells that limit would finish, stop part-way, or leave.")
@click.option("--allow-precision-change", is_flag=True,
              help="Run the cells left even where this machine trains them in another precision than the "
                   "finished cells (precision auto: bf16 where it is native, fp32 elsewhere).")
@click.option("--max-cells", type=click.IntRange(min=1), default=None,
              help="Run only the first N cells left, in the plan's order, then stop (exit 0): a piece of a long "
                   "sweep; running it again goes on with the next.")
@click.option("--time-limit", type=Duration(), default=None,
              help="Stop by this long from now (such as 2h30m, 90m; exit 0): a cell stops at its last checkpoint "
                   "before it, and no cell starts that could not save its first epoch in time; running the sweep "
                   "again resumes.")
def sweep(spec, parallel, executor, ray_address, dry_run, allow_precision_change, max_cells, time_limit):
    """Run a grid of prune jobs from a YAML SPEC, one MLflow child run per cell.

    Cells that already have a FINISHED run with the same configuration are skipped, so
    running a sweep again after a kill or a failure runs only what is missing.

    \b
    Example (a CPU smoke sweep in a few minutes):
      prunetrack sweep sweeps/smoke.yaml --parallel 2
    """
    from prunetrack import sweep as sweeps
    from prunetrack.spec import SpecError, load_spec
    from prunetrack.store import TrackingError

    try:
        loaded = load_spec(spec)
    except SpecError as e:
        raise click.BadParameter(str(e), param_hint="SPEC") from None
    try:
        sweeps.run_sweep(loaded, parallel=parallel, executor=executor, ray_address=ray_address, dry_run=dry_run,
                         echo=lambda line: click.echo(line), allow_precision_change=allow_precision_change,
                         max_cells=max_cells, time_limit=time_limit)
    except (sweeps.SweepFailed, sweeps.PrecisionChange, TrackingError) as e:
        raise click.ClickException(str(e)) from None


@cli.command("time")
@click.option("--experiment", required=True, help="MLflow experiment whose FINISHED prune runs are timed.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed test-set evaluations per run, one per round, runs interleaved.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Evaluation batch size.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--data-dir", default="", help="Where the dataset is (default: each run's data_dir).")
@click.option("--models", default="", callback=_csv(str, "model names"), help="Only these models (default: all).")
@click.option("--untimed", is_flag=True,
              help="Only the runs without a timed_test_time yet: the cells a growing study finished since its "
                   "last pass. A pass over every run compares best; a study's last one should be.")
@click.option("--precision", type=click.Choice(config.TIMING_PRECISIONS), default="trained",
              show_default=True,
              help="Arithmetic of the timed evaluations: each run's own (trained), or one for every run (auto: bf16 "
                   "where this device computes it natively, fp32 elsewhere). One for all compares runs that "
                   "trained in different precisions.")
@click.option("--settle", type=click.FloatRange(min=0), default=180, show_default=True,
              help="Seconds to wait at most for the load average to fall (the machine to be idle) before "
                   "timing; 0: start at once.")
def time_cmd(experiment, rounds, batch_size, device, data_dir, models, untimed, precision, settle):
    """Time inference under the same conditions for every finished run: rebuild each
    network from its logged masks, time a full test-set evaluation of each in interleaved
    rounds, and log the median and spread (timed_test_time*) and the conditions
    (timing.* tags) to each run. Run it with nothing else running; the report's
    testing-time table uses it.

    \b
    Example:
      prunetrack time --experiment study --rounds 5
      prunetrack time --experiment study --precision auto
    """
    from prunetrack import store, timing

    try:
        timing.time_runs(experiment, rounds, batch_size, device, data_dir, models, echo=click.echo, untimed=untimed,
                         precision=precision, settle_s=settle)
    except (store.TrackingError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


@cli.command("export")
@click.option("--experiment", required=True, help="MLflow experiment whose runs are exported.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="File to write: JSON lines, gzip-compressed when the name ends in .gz.")
def export_cmd(experiment, output):
    """Export an experiment's runs compactly: params, tags, metric histories and the
    per-layer and histogram numbers (no masks or images), for `prunetrack import`.

    \b
    Example:
      prunetrack export --experiment study -o reports/cifar10/runs.jsonl.gz
    """
    from prunetrack import archive

    try:
        s = archive.export_runs(experiment, output, echo=click.echo)
    except archive.ArchiveError as e:
        raise click.ClickException(str(e)) from None
    note = f"; {plural(s.skipped_running, 'RUNNING run')} left out" if s.skipped_running else ""
    click.echo(f"exported {plural(s.runs, 'run')} to {s.path} ({s.bytes / 1024:,.0f} KiB){note}")


@cli.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--experiment", default=None, help="Experiment to import into (default: the exported one's name).")
def import_cmd(file, experiment):
    """Load runs written by `prunetrack export` into the tracking store
    (MLFLOW_TRACKING_URI, or ./mlflow.db). Runs imported before are skipped.

    \b
    Example (then `prunetrack report --experiment study --name cifar10`):
      prunetrack import reports/cifar10/runs.jsonl.gz
    """
    from prunetrack import archive

    try:
        s = archive.import_runs(file, experiment, echo=click.echo)
    except archive.ArchiveError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"imported {plural(s.imported, 'run')} into experiment {s.experiment!r}"
               + (f" ({s.skipped} imported before, skipped" if s.skipped else "")
               + (f"; {s.deleted} of them deleted here, left deleted: `mlflow runs restore --run-id ID` brings "
                  "one back" if s.deleted else "") + (")" if s.skipped else ""))


def main(argv=None) -> None:
    """Console-script entry. Under `mlflow run` the run already exists before our code
    starts, so a usage error is written into that run (tag `error`, status FAILED)
    rather than only printed."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        _fail_mlflow_run(e.format_message())
        sys.exit(e.exit_code)
    except Exception as e:
        _fail_mlflow_run(f"{type(e).__name__}: {e}")
        raise


def _fail_mlflow_run(message: str) -> None:
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from prunetrack import tracking

    try:
        tracking.end_if_running(run_id, "FAILED", message)
    except Exception:  # the store itself may be what failed; the message is printed anyway
        pass
