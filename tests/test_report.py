"""The report, against a store filled by real tiny prune jobs: every cell is checked
against the runs' own metrics, read back independently through the MLflow client."""
from __future__ import annotations

import json
import os
import re
import socket
import statistics
import time

import matplotlib.image
import mlflow
import pytest
import yaml
from click.testing import CliRunner
from conftest import CROWD, REPO, SMOKE
from mlflow.tracking import MlflowClient

from prunetrack import cli
from prunetrack.config import JobConfig
from prunetrack.job import run_job
from prunetrack.report import ReportError, ReportOptions, build_report, render

TINY = dict(SMOKE, train_subset=256, test_subset=128)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def job(experiment: str, **overrides) -> str:
    return run_job(JobConfig.from_flat(dict(TINY, experiment=experiment, **overrides)))


@pytest.fixture(scope="module")
def study(tmp_path_factory, new_store):
    """A store with real jobs: Rand at 1x and 10x (10x with two seeds), Mag at 10x; a
    finished Rand 5x run that logged its accuracy and nothing else (as a run from an
    older version, or a hand-made one, would), and a FAILED Mag 1x run that must not count."""
    root = tmp_path_factory.mktemp("study")
    uri = new_store(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        ids = {
            ("rand", 1.0, 0): job("study", pruner="rand", compression=1, lr=0.002),
            ("rand", 10.0, 0): job("study", pruner="rand", compression=10),
            ("rand", 10.0, 1): job("study", pruner="rand", compression=10, seed=1),
            ("mag", 10.0, 0): job("study", pruner="mag", compression=10),
        }
        client = MlflowClient()
        exp = client.get_experiment_by_name("study")
        bare = client.create_run(exp.experiment_id, tags={"model": "resnet20", "pruner": "rand",
                                                          "compression": "5", "dataset": "synthetic"})
        client.log_metric(bare.info.run_id, "test_accuracy", 42.0)
        client.set_terminated(bare.info.run_id, "FINISHED")
        # A failed run in an otherwise empty cell, with a metric that would show if it counted.
        failed = client.create_run(exp.experiment_id, tags={"model": "resnet20", "pruner": "mag",
                                                            "compression": "1", "dataset": "synthetic"})
        client.log_metric(failed.info.run_id, "test_accuracy", 99.0)
        client.set_terminated(failed.info.run_id, "FAILED")
        opts = ReportOptions(experiment="study", name="tiny", output_dir=str(root / "reports"),
                             models=["resnet20"], pruners=["rand", "mag"], compressions=[1, 5, 10, 20])
        path = build_report(opts)
        yield dict(root=root, uri=uri, ids=ids, client=client, path=path, opts=opts,
                   text=open(path).read(), runs={k: client.get_run(v) for k, v in ids.items()})
        mlflow.set_tracking_uri(None)


def table(text: str, number: int) -> dict[str, dict[str, str]]:
    """Table `number` of the report as {first cell: {column: cell}}."""
    block = text.split(f"**Table {number}.**", 1)[1].split("\n\n", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def check_png(path) -> None:
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_cells_equal_the_runs_metrics(study):
    runs, text = study["runs"], study["text"]
    acc = {k: r.data.metrics["test_accuracy"] for k, r in runs.items()}
    t2 = table(text, 2)
    assert t2["1x"]["Rand"] == f"{acc[('rand', 1.0, 0)]:.2f}"
    assert t2["10x"]["Mag"] == f"{acc[('mag', 10.0, 0)]:.2f}"
    seeds = [acc[("rand", 10.0, 0)], acc[("rand", 10.0, 1)]]
    assert t2["10x"]["Rand"] == f"{statistics.fmean(seeds):.2f} ± {statistics.stdev(seeds):.2f} (n=2)"
    assert table(text, 1)["ResNet20"] == {"Model": "ResNet20", "Rand": t2["10x"]["Rand"], "Mag": t2["10x"]["Mag"]}

    t3 = table(text, 3)
    assert t3["10x"]["Mag"] == f"{runs[('mag', 10.0, 0)].data.metrics['test_time'] * 1e3:,.1f}"
    times = [runs[("rand", 10.0, s)].data.metrics["test_time"] * 1e3 for s in (0, 1)]
    assert times[0] != times[1]
    assert t3["10x"]["Rand"] == f"{statistics.fmean(times):,.1f} ± {statistics.stdev(times):,.1f} (n=2)"
    t4 = table(text, 4)
    mag = study["client"].get_run(study["ids"][("mag", 10.0, 0)]).data.metrics
    assert t4["10x"]["Mag"] == f"{mag['flops_effective'] / 1e6:,.1f}"
    flops = [runs[("rand", 10.0, s)].data.metrics["flops_effective"] / 1e6 for s in (0, 1)]
    assert t4["10x"]["Rand"] == f"{statistics.fmean(flops):,.1f} ± {statistics.stdev(flops):,.1f} (n=2)"
    assert t2["5x"]["Rand"] == "42.00" and t4["5x"]["Rand"] == "—*"  # a run, but no FLOPs logged

    layers = mlflow.artifacts.load_dict(f"runs:/{study['ids'][('mag', 10.0, 0)]}/layers.json")
    t5, t6 = table(text, 5), table(text, 6)
    assert len(t5) == len(layers["data"])
    for row in layers["data"]:
        r = dict(zip(layers["columns"], row))
        assert t5[f"`{r['layer']}`"]["Params"] == f"{r['params']:,}"
        assert t5[f"`{r['layer']}`"]["Mag"] == f"{100 * (1 - r['density']):.2f}"
        assert t6[f"`{r['layer']}`"]["Mag"] == f"{r['flops_effective'] / 1e6:,.2f}"
        assert t6[f"`{r['layer']}`"]["Dense"] == f"{r['flops_dense'] / 1e6:,.2f}"
        assert t6[f"`{r['layer']}`"]["Rand"] != "—*"


def test_failed_runs_ignored_and_missing_cells_listed(study):
    text = study["text"]
    t2 = table(text, 2)
    assert t2["1x"]["Mag"] == "—"  # only the FAILED run (99%) is there
    assert "99.00" not in text
    assert t2["20x"] == {"Compression": "20x", "Rand": "—", "Mag": "—"}
    missing = text.split("## Missing cells", 1)[1]
    for pruner, c in (("Mag", "1x"), ("Rand", "20x"), ("Mag", "20x")):
        assert f"[ResNet20 · {pruner} · {c}]: no finished run" in missing
    assert ("`mlflow run . --env-manager local -e prune --experiment-name study -P model=resnet20 -P pruner=mag -P compression=20 "
            "-P dataset=synthetic") in missing
    # The protocol of the runs found travels with the command.
    line = next(ln for ln in missing.splitlines() if "-P pruner=mag -P compression=20" in ln)
    assert "-P post_epochs=1" in line and "-P train_subset=256" in line and "-P batch_size=128" in line
    assert re.search(r"\[ResNet20 · Rand · 5x\]: .*not logged", missing)
    assert "Ignored (not FINISHED): 1 FAILED" in text


def test_settings_and_findings_come_from_the_runs(study):
    text, runs = study["text"], study["runs"]
    settings = text.split("## Settings", 1)[1].split("## Tables", 1)[0]
    rand1 = runs[("rand", 1.0, 0)]
    lr_line = next(ln for ln in settings.splitlines() if "**Learning rate**" in ln)
    assert "differs" in lr_line and "`0.002` in 1 run (" in lr_line and rand1.info.run_id[:8] in lr_line
    # Synthetic data is drawn from the seed, so the seed-1 run used other data: flagged, by name.
    sha_line = next(ln for ln in settings.splitlines() if "**Dataset SHA-256**" in ln)
    seed1 = runs[("rand", 10.0, 1)]
    assert "differs" in sha_line
    assert f"`{seed1.data.tags['dataset_sha256']}` in 1 run ({seed1.info.run_name} ({seed1.info.run_id[:8]}))" \
        in sha_line
    commit_line = next(ln for ln in settings.splitlines() if "**Git commit**" in ln)
    assert f"`{render.short_commit(rand1.data.tags['git_commit'])}`" in commit_line

    findings = text.split("## Findings", 1)[1].split("## Missing cells", 1)[0]
    acc = {k: r.data.metrics["test_accuracy"] for k, r in runs.items()}
    rand10 = statistics.fmean([acc[("rand", 10.0, 0)], acc[("rand", 10.0, 1)]])
    best = "Mag" if acc[("mag", 10.0, 0)] > rand10 else "Rand"
    assert "At 10x [ResNet20 · 10x], n=1-2 per pruner: " in findings and f"**{best}** is highest" in findings
    assert "[ResNet20 · Mag · 10x]" in findings and "[ResNet20 · Rand · 10x]" in findings
    base = acc[("rand", 1.0, 0)]
    line = next(ln for ln in findings.splitlines() if ln.startswith("- Rand against the dense baseline"))
    assert line.startswith(f"- Rand against the dense baseline, {base:.2f}% [ResNet20 · 1x]: 5x 42.00% ({42 - base:+.2f}, ")
    assert f", 10x {rand10:.2f}% ({rand10 - base:+.2f}, " in line
    layers = mlflow.artifacts.load_dict(f"runs:/{study['ids'][('mag', 10.0, 0)]}/layers.json")
    dens = {row[0]: row[layers["columns"].index("density")] for row in layers["data"]}
    lo, hi = min(dens, key=dens.get), max(dens, key=dens.get)
    assert f"prunes `{lo}` most (density {dens[lo]:.4f}) and `{hi}` least" in findings
    mag = study["client"].get_run(study["ids"][("mag", 10.0, 0)]).data.metrics
    measured = rand1.data.metrics["test_time"] / mag["test_time"]
    # Whether Mag's timing repeats overlap the dense network's depends on the machine's noise: if they do,
    # Mag is in the one sentence for such cells (its speedups among the ranges' ends), else on its own line.
    speedups = [ln for ln in findings.splitlines() if "FLOPs predict" in ln]
    own = [ln for ln in speedups if ln.startswith("- [ResNet20 · Mag · 10x]: ")]
    if own:
        assert own[0].startswith(f"- [ResNet20 · Mag · 10x]: FLOPs predict a {mag['theoretical_speedup']:.2f}x speedup")
        assert f"is a {measured:.2f}x speedup" in own[0]
    else:
        grouped = next(ln for ln in speedups if ln.startswith("- No measurable speedup in "))
        assert f"{mag['theoretical_speedup']:.2f}" in grouped and f"{measured:.2f}" in grouped, grouped


def test_figures_are_valid_pngs_and_logged_to_a_report_run(study):
    out = os.path.dirname(study["path"])
    expected = {"accuracy_vs_compression.png", "test_time_vs_compression.png", "flops_vs_compression.png",
                "layer_density.png", "weight_histograms_mag.png", "weight_histograms_rand.png", "loss_curves.png"}
    assert {f for f in os.listdir(out) if f.endswith(".png")} == expected  # no Rand histograms: none logged
    for name in expected:
        check_png(os.path.join(out, name))
        assert f"]({name})" in study["text"]
    assert study["text"].count("**Figure ") == len(expected)

    client = study["client"]
    exp = client.get_experiment_by_name("study")
    reports = client.search_runs([exp.experiment_id], "tags.`prunetrack.kind` = 'report'")
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(reports[0].info.run_id)}
    assert logged == expected | {"REPORT.md", "REPORT.html"}
    assert reports[0].data.tags["mlflow.note.content"].startswith("The report `tiny` of experiment `study`: "
                                                                 "`REPORT.html` (one page, figures inline)")
    local = client.download_artifacts(reports[0].info.run_id, "REPORT.md", str(study["root"]))
    assert open(local).read() == study["text"]
    # The page MLflow's artifact viewer shows: tables as tables, every figure inlined, links that resolve.
    page = mlflow.artifacts.load_text(f"runs:/{reports[0].info.run_id}/REPORT.html")
    assert page.count("<table>") == study["text"].count("\n|---|") > 0
    assert page.count('src="data:image/png;base64,') == len(expected) and ".png\"" not in page
    assert 'href="#missing-cells"' in page and 'id="missing-cells"' in page


def test_second_report_skips_the_report_run(study):
    opts = ReportOptions(**{**study["opts"].__dict__, "name": "again"})
    text = open(build_report(opts)).read()
    assert table(text, 2) == table(study["text"], 2)
    assert "Read from the 5 finished prune runs" in text


def test_unknown_and_empty_experiments(mlflow_store):
    mlflow.set_experiment("has-runs")
    MlflowClient().create_experiment("empty")
    with pytest.raises(ReportError, match=r"no experiment named 'nope'.*existing experiments: .*empty.*has-runs"):
        build_report(ReportOptions(experiment="nope"))
    with pytest.raises(ReportError, match="experiment 'empty' has no FINISHED prune runs"):
        build_report(ReportOptions(experiment="empty"))


def test_tracking_server_that_does_not_answer(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        start = time.perf_counter()
        result = CliRunner().invoke(cli.cli, ["report", "--experiment", "study", "--output-dir", str(tmp_path)])
        assert result.exit_code != 0
        assert f"the tracking server at {uri} does not answer" in result.output
        assert time.perf_counter() - start < 30
    finally:
        mlflow.set_tracking_uri(None)


def test_bad_list_options_are_rejected():
    result = CliRunner().invoke(cli.cli, ["report", "--experiment", "x", "--compressions", "1,ten"])
    assert result.exit_code == 2 and "comma-separated compression ratios" in result.output
    result = CliRunner().invoke(cli.cli, ["report", "--experiment", "x", "--compressions", "0.5,2"])
    assert result.exit_code == 2 and "must be >= 1" in result.output


def test_mlproject_report_entry_matches_the_command():
    with open(os.path.join(REPO, "MLproject")) as fh:
        entry = yaml.safe_load(fh)["entry_points"]["report"]
    options = {p.name for p in cli.cli.commands["report"].params}
    assert set(entry["parameters"]) == options
    for name in options:
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"]


@pytest.mark.xdist_group(CROWD)
def test_report_against_a_real_mlflow_server(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        ids = {p: job("served", pruner=p, compression=10) for p in ("rand", "mag")}
        result = CliRunner().invoke(cli.cli, ["report", "--experiment", "served", "--models", "resnet20",
                                              "--pruners", "rand,mag", "--compressions", "10",
                                              "--output-dir", str(tmp_path / "reports")])
        assert result.exit_code == 0, result.output
        text = (tmp_path / "reports" / "served" / "REPORT.md").read_text()
        client = MlflowClient()
        row = table(text, 1)["ResNet20"]
        for p, label in (("rand", "Rand"), ("mag", "Mag")):
            assert row[label] == f"{client.get_run(ids[p]).data.metrics['test_accuracy']:.2f}"
        check_png(tmp_path / "reports" / "served" / "layer_density.png")
        exp = client.get_experiment_by_name("served")
        (report,) = client.search_runs([exp.experiment_id], "tags.`prunetrack.kind` = 'report'")
        assert {"REPORT.md", "layer_density.png"} <= {a.path for a in client.list_artifacts(report.info.run_id)}
    finally:
        mlflow.set_tracking_uri(None)


def test_export_then_import_regenerates_the_same_report(study, tmp_path, monkeypatch, new_store):
    """The committed-export path: runs exported from one store and imported into an
    empty one give the same tables, and the same histories, statuses and artifacts."""
    export = tmp_path / "runs.jsonl.gz"

    def layers_of(client, run_id):
        dest = tmp_path / run_id
        dest.mkdir()
        with open(client.download_artifacts(run_id, "layers.json", str(dest))) as fh:
            return json.load(fh)

    copy_uri = new_store(tmp_path / "copy.db")
    try:
        result = CliRunner().invoke(cli.cli, ["export", "--experiment", "study", "-o", str(export)])
        assert result.exit_code == 0, result.output
        assert "exported 6 runs" in result.output  # 4 jobs, the bare run and the FAILED one; no report runs

        monkeypatch.setenv("MLFLOW_TRACKING_URI", copy_uri)
        mlflow.set_tracking_uri(copy_uri)
        result = CliRunner().invoke(cli.cli, ["import", str(export)])
        assert result.exit_code == 0, result.output
        assert "imported 6 runs into experiment 'study'" in result.output
        again = CliRunner().invoke(cli.cli, ["import", str(export)])
        assert again.exit_code == 0 and "imported 0 runs" in again.output and "6 imported before" in again.output

        client = MlflowClient()
        copies = {r.data.tags["prunetrack.imported_from"]: r for r in mlflow.search_runs(
            experiment_names=["study"], output_format="list")}
        assert len(copies) == 6
        for original_id in study["ids"].values():
            original, copy = study["client"].get_run(original_id), copies[original_id]
            assert copy.info.status == original.info.status == "FINISHED"
            assert (copy.info.start_time, copy.info.end_time) == (original.info.start_time, original.info.end_time)
            assert copy.data.params == original.data.params
            assert copy.data.metrics == original.data.metrics
            history = lambda c, rid: [(m.step, m.timestamp, m.value) for m in c.get_metric_history(rid, "test_loss")]
            assert history(client, copy.info.run_id) == history(study["client"], original_id)
            assert layers_of(client, copy.info.run_id) == layers_of(study["client"], original_id)
        assert sorted(r.info.status for r in copies.values()).count("FAILED") == 1

        opts = ReportOptions(**{**study["opts"].__dict__, "output_dir": str(tmp_path / "reports")})
        text = open(build_report(opts)).read()
        for n in range(1, 7):
            assert table(text, n) == table(study["text"], n), f"table {n} differs after export/import"
        section = lambda t: t.split("## Missing cells", 1)[1]
        assert section(text) == section(study["text"])
        assert (sorted(f for f in os.listdir(os.path.dirname(study["path"])) if f.endswith(".png"))
                == sorted(f for f in os.listdir(tmp_path / "reports" / "tiny") if f.endswith(".png")))
    finally:
        mlflow.set_tracking_uri(study["uri"])


STUDY_REPORT = os.path.join(REPO, "reports", "cifar10")


@pytest.mark.skipif(not os.path.exists(os.path.join(STUDY_REPORT, "runs.jsonl.gz")), reason="no committed study")
def test_the_committed_study_report_is_what_its_committed_export_regenerates(tmp_path, monkeypatch, new_store):
    """What the README promises a reader of reports/cifar10: importing the committed export
    into an empty store and running the report gives the committed tables and findings (run
    ids aside: imported runs get new ones)."""
    uri = new_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    try:
        result = CliRunner().invoke(cli.cli, ["import", os.path.join(STUDY_REPORT, "runs.jsonl.gz")])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(cli.cli, ["report", "--experiment", "study", "--name", "cifar10",
                                              "--output-dir", str(tmp_path / "reports")])
        assert result.exit_code == 0, result.output
    finally:
        mlflow.set_tracking_uri(None)
    committed = open(os.path.join(STUDY_REPORT, "REPORT.md")).read()
    text = open(tmp_path / "reports" / "cifar10" / "REPORT.md").read()
    numbers = re.findall(r"\*\*Table (\d+)\.\*\*", committed)
    assert numbers and numbers == re.findall(r"\*\*Table (\d+)\.\*\*", text)
    for n in numbers:
        assert table(text, int(n)) == table(committed, int(n)), f"table {n} differs from the committed report's"
    findings = lambda t: re.sub(r"\([0-9a-f]{8}\)", "(id)", t.split("## Findings", 1)[1].split("\n## ", 1)[0])
    assert findings(text) == findings(committed)

def test_import_refuses_a_file_that_is_not_an_export(mlflow_store, tmp_path):
    bad = tmp_path / "runs.jsonl"
    bad.write_text('{"run_id": "abc"}\n')
    result = CliRunner().invoke(cli.cli, ["import", str(bad)])
    assert result.exit_code != 0
    assert "is not a prunetrack export" in result.output and "prunetrack export" in result.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    missing = CliRunner().invoke(cli.cli, ["export", "--experiment", "nope", "-o", str(tmp_path / "x.jsonl")])
    assert missing.exit_code != 0 and "no experiment named 'nope'" in missing.output


def test_synflow_paper_comparison_reads_the_protocol_from_the_runs():
    from prunetrack.report import Run, assemble, synflow_paper_section

    def run(pruner, c, acc, source, **params):
        base = dict(dataset="cifar10", optimizer="adam", lr="0.001", post_epochs="10", batch_size="256",
                    iterations="100" if pruner == "synflow" else "1")
        return Run(f"id-{pruner}-{c}", f"{pruner}-{c}", "vgg16", pruner, c, "0", {**base, **params},
                   {"dataset_source": source}, {"test_accuracy": acc})

    def section(source, **params):
        runs = [run("rand", 1.0, 90.0, source, **params), run("synflow", 10.0, 88.5, source, **params),
                run("snip", 10.0, 87.0, source, **params)]
        study = assemble(ReportOptions(experiment="x", models=["vgg16"], pruners=["rand", "snip", "synflow"],
                                       compressions=[1, 10]), runs)
        return study, "\n".join(synflow_paper_section(study))

    study, text = section("CIFAR-10 offline copy (cifar10-jpeg.npz): a JPEG round trip of all 60,000 images")
    assert "| Training epochs | 160 | 10 |" in text
    assert "| Optimizer | SGD, momentum 0.9 (Nesterov) | adam |" in text
    assert "| SynFlow iterations | 100 | 100 |" in text
    assert "dense VGG16 reaches 90.00%" in text and "10x: 88.50% (-1.50 vs dense)" in text
    # The prose says what these runs did, not a fixed story.
    assert ("reach a higher dense accuracy than these runs' 10 epochs of adam without an lr schedule or weight "
            "decay or BatchNorm, so absolute accuracies here are expected below the paper's at every ratio, and "
            "the data these runs used is a JPEG round trip of CIFAR-10") in text
    _, text = section("cifar10 as found in the data directory", optimizer="momentum", post_epochs="160",
                      lr_drops="60,120", weight_decay="0.0001")
    assert "JPEG" not in text and "short" not in text
    assert ("These runs train for 160 epochs of momentum with lr drops at epochs 60,120 and weight decay 0.0001, "
            "without BatchNorm, close to the paper's") in text
    assert "the data these runs used: cifar10 as found in the data directory" in text
    study.dataset = "cifar100"  # the paper's VGG-16 / CIFAR-10 curves say nothing about other data
    assert synflow_paper_section(study) == []
