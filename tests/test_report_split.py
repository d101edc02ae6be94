"""The report's steps on records built by hand: the tables, the missing-cell list and the
figure set that a known set of runs must give, with no tracking server; and one run
through MLflow of what the study needs beyond that (the dense cell shared at 1x, the
pre-training, the controlled timing pass)."""
from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from test_report import check_png, job, table

from prunetrack.report import ReportError, ReportOptions, Run, assemble, build_report, figures, findings, render, tables

HIST = {"layers": {"conv1": {"init": {"counts": [1, 2], "edges": [-1.0, 0.0, 1.0]},
                             "final": {"counts": [2, 1], "edges": [-1.0, 0.0, 1.0]}, "density": 0.5}}}


def layer(name: str, shape: str, params: int, density: float, flops_dense: float) -> dict:
    return {"layer": name, "shape": shape, "params": params, "density": density, "flops_dense": flops_dense,
            "flops_effective": flops_dense * density}


def make_run(pruner: str, c: float, seed: int = 0, metrics: dict | None = None, tags: dict | None = None,
             params: dict | None = None, model: str = "resnet20", **details) -> Run:
    base = dict(dataset="synthetic", optimizer="adam", lr="0.001", batch_size="128", post_epochs="10",
                weight_decay="0.0", lr_drops="", prune_per_class="10", scope="global", precision="auto",
                pre_epochs="0", pre_patience="0", iterations="100" if pruner == "synflow" else "1")
    run_tags = {"model": model, "pruner": pruner, "compression": f"{c:g}", "seed": str(seed),
                "dataset_source": "synthetic (generated)", "precision": "bf16"}
    if c == 1:
        run_tags["dense"] = "true"
    return Run(f"{pruner}{c:g}s{seed}" + "0" * 24, f"{model}-{pruner}-{c:g}x-s{seed}", model, pruner, float(c),
               str(seed), {**base, **(params or {})}, {**run_tags, **(tags or {})}, dict(metrics or {}), **details)


def hand_built() -> list[Run]:
    return [
        make_run("rand", 1, metrics={"test_accuracy": 80.0, "test_time": 0.010, "flops_effective": 80e6,
                                     "flops_dense": 80e6}),
        make_run("rand", 10, 0, metrics={"test_accuracy": 70.0, "test_time": 0.008, "flops_effective": 8e6,
                                         "flops_dense": 80e6},
                 layers=[layer("conv1", "16x3x3x3", 432, 0.5, 1e6), layer("fc", "10x64", 640, 0.1, 640)],
                 histograms=HIST,
                 histories={"train_loss": [(1, 2.0), (2, 1.5)], "test_loss": [(1, 2.1), (2, 1.8)]}),
        make_run("rand", 10, 1, metrics={"test_accuracy": 72.0, "test_time": 0.009, "flops_effective": 8e6,
                                         "flops_dense": 80e6},
                 layers=[layer("conv1", "16x3x3x3", 432, 0.4, 1e6), layer("fc", "10x64", 640, 0.1, 640)],
                 histories={"train_loss": [(1, 2.2), (2, 1.7)], "test_loss": [(1, 2.3), (2, 2.0)]}),
        make_run("mag", 10, metrics={"test_accuracy": 75.0, "flops_effective": 16e6, "flops_dense": 80e6},
                 layers=[layer("conv1", "16x3x3x3", 432, 0.3, 1e6)]),
    ]


def hand_study(runs=None, **opts):
    options = dict(experiment="x", models=["resnet20"], pruners=["rand", "mag", "snip"], compressions=[1, 10])
    return assemble(ReportOptions(**{**options, **opts}), runs or hand_built())


def rows(text: str, number: int) -> list[list[str]]:
    block = text.split(f"**Table {number}.**", 1)[1].split("\n\n", 2)[1]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in block.splitlines()[2:] if ln.startswith("|")]


def test_tables_from_records_equal_the_expected_rows():
    s = hand_study()
    text = "\n".join(tables.tables_section(s))
    assert rows(text, 1) == [["ResNet20", "71.00 ± 1.41 (n=2)", "75.00", "—"]]
    assert rows(text, 2) == [["1x", "80.00 †", "—", "80.00 †"], ["10x", "71.00 ± 1.41 (n=2)", "75.00", "—"]]
    assert rows(text, 3) == [["1x", "10.0 †", "—", "10.0 †"], ["10x", "8.5 ± 0.7 (n=2)", "—*", "—"]]
    assert rows(text, 4) == [["1x", "80.0 †", "—", "80.0 †"], ["10x", "8.0 ± 0.0 (n=2)", "16.0", "—"]]
    assert rows(text, 5) == [["`conv1`", "16x3x3x3", "432", "55.00 ± 7.07 (n=2)", "70.00", "—"],
                             ["`fc`", "10x64", "640", "90.00 ± 0.00 (n=2)", "—*", "—"]]
    assert rows(text, 6) == [["`conv1`", "1.00", "0.45 ± 0.07 (n=2)", "0.30", "—"],
                             ["`fc`", "0.00", "0.00 ± 0.00 (n=2)", "—*", "—"]]
    # The missing list is computed with the records, before anything is drawn.
    assert s.missing == {
        ("resnet20", "mag", 1.0): {"no finished run"},
        ("resnet20", "snip", 10.0): {"no finished run"},
        ("resnet20", "mag", 10.0): {"test_time not logged", "layers.json not logged", "per-layer FLOPs not logged",
                                    "histograms.json not logged"},
    }
    # Every mark in the tables is a cell of the missing list, and the other way round.
    marked = {(p, c) for n in (2, 3, 4) for row in rows(text, n) for p, cell in zip(s.pruners, row[1:])
              for c in [float(row[0].rstrip("x"))] if cell in ("—", "—*")}
    assert marked == {(p, c) for (_, p, c) in s.missing}


def test_runs_on_several_datasets_need_a_choice():
    """A report mixes no datasets: without --dataset the error names each one with its run
    count, and choosing one reports only its runs."""
    runs = hand_built() + [make_run("rand", 10, 5, params={"dataset": "cifar10"},
                                    metrics={"test_accuracy": 90.0})]
    with pytest.raises(ReportError) as e:
        hand_study(runs)
    assert "synthetic: 4 runs, cifar10: 1 run" in str(e.value) and "--dataset" in str(e.value)
    assert [r.name for r in hand_study(runs, dataset="cifar10").runs] == ["resnet20-rand-10x-s5"]


def test_figure_set_from_records(tmp_path):
    s = hand_study()
    entries = figures.draw(s, str(tmp_path))
    files = [f for f, _ in entries if f]
    assert files == ["accuracy_vs_compression.png", "test_time_vs_compression.png", "flops_vs_compression.png",
                     "layer_density.png", "weight_histograms_rand.png", "loss_curves.png"]
    assert sorted(os.listdir(tmp_path)) == sorted(files)
    for f in files:
        check_png(tmp_path / f)


def test_steps_do_not_depend_on_each_other(tmp_path):
    """Findings before figures, and twice: the same text (no step reads what another left behind)."""
    s = hand_study()
    first = findings.findings(s)
    figures.draw(s, str(tmp_path))
    assert findings.findings(s) == first
    missing = {k: set(v) for k, v in s.missing.items()}
    render.render(s, str(tmp_path))
    assert s.missing == missing


def test_render_needs_no_tracking_server(tmp_path):
    text = render.render(hand_study(), str(tmp_path))
    for section in ("## Settings", "## Tables", "## Figures", "## Pre-training (Magnitude)", "## Findings",
                    "## Missing cells"):
        assert section in text
    assert text.count("**Figure ") == 6
    assert "[ResNet20 · SNIP · 1x]" not in text.split("## Missing cells", 1)[1]  # shared, so not missing


@pytest.fixture(scope="module")
def pretrained_store(tmp_path_factory, new_store):
    """Real jobs: the dense Rand 1x run, SNIP 10x, and Magnitude at 1x and 10x from one shared
    pre-training; then timing metrics as the controlled timing pass logs them, on every
    run but SNIP's."""
    root = tmp_path_factory.mktemp("pretrained")
    uri = new_store(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("PRUNETRACK_CHECKPOINT_DIR", str(root / "checkpoints"))
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        ids = {("rand", 1): job("pre", pruner="rand", compression=1),
               ("snip", 10): job("pre", pruner="snip", compression=10),
               ("mag", 1): job("pre", pruner="mag", compression=1, pre_epochs=3, pre_patience=1),
               ("mag", 10): job("pre", pruner="mag", compression=10, pre_epochs=3, pre_patience=1)}
        client = MlflowClient()
        timed = {}
        for i, key in enumerate([("rand", 1), ("mag", 1), ("mag", 10)]):
            timed[key] = (0.020 + 0.001 * i, 0.019 + 0.001 * i, 0.025 + 0.001 * i)
            for name, v in zip(("timed_test_time", "timed_test_time_min", "timed_test_time_max"), timed[key]):
                client.log_metric(ids[key], name, v)
            for k, v in {"timing.rounds": "3", "timing.threads": "2", "timing.device": "cpu-test",
                         "timing.batch_size": "50", "timing.precision": "fp32", "timing.loadavg": "0.25",
                         "timing.when": "2026-01-01T00:00:00+00:00"}.items():
                client.set_tag(ids[key], k, v)
        opts = ReportOptions(experiment="pre", name="pre", output_dir=str(root / "reports"), models=["resnet20"],
                             compressions=[1, 10])
        path = build_report(opts)
        runs = {k: client.get_run(v) for k, v in ids.items()}
        yield dict(text=open(path).read(), folder=os.path.dirname(path), runs=runs, timed=timed, client=client)
        mlflow.set_tracking_uri(None)


def test_dense_cell_shared_at_1x_through_mlflow(pretrained_store):
    text, runs = pretrained_store["text"], pretrained_store["runs"]
    rand1, mag1 = runs[("rand", 1)], runs[("mag", 1)]
    assert rand1.data.tags["dense"] == "true" and mag1.data.tags["pretrain_run"]
    acc = f"{rand1.data.metrics['test_accuracy']:.2f} †"
    assert table(text, 2)["1x"] == {"Compression": "1x", "Rand": acc, "Mag": f"{mag1.data.metrics['test_accuracy']:.2f}",
                                    "SNIP": acc, "GraSP": acc, "SynFlow": acc}
    label = f"{rand1.info.run_name} ({rand1.info.run_id[:8]})"
    assert (f"† the dense network at 1x: nothing is pruned at 1x, so Rand, SNIP, GraSP and SynFlow share one run "
            f"(run {label}); Magnitude's 1x starts from its pre-trained weights and is its own run.") in text
    found = text.split("## Findings", 1)[1]
    assert f"- Dense baseline [ResNet20 · 1x]: {rand1.data.metrics['test_accuracy']:.2f}% test accuracy, from 1 run" \
        in found
    assert "left out: 1 run at 1x that starts from a pre-training" in found and mag1.info.run_id[:8] in found
    missing = text.split("## Missing cells", 1)[1]
    for p in ("SNIP", "GraSP", "SynFlow"):
        assert f"[ResNet20 · {p} · 1x]" not in missing


def test_pretraining_section_through_mlflow(pretrained_store):
    text, client = pretrained_store["text"], pretrained_store["client"]
    pre_id = pretrained_store["runs"][("mag", 10)].data.tags["pretrain_run"]
    assert pretrained_store["runs"][("mag", 1)].data.tags["pretrain_run"] == pre_id
    pre = client.get_run(pre_id)
    m, stopped = pre.data.metrics, pre.data.tags["stopped"]
    section = text.split("## Pre-training (Magnitude)", 1)[1].split("## Findings", 1)[0]
    head = (f"Magnitude prunes the weights of one shared pre-training (run {pre.info.run_name} ({pre_id[:8]}); "
            f"2 runs start from it): {int(m['epochs_run'])} epoch")
    assert head in section
    best = f"best test loss {m['best_test_loss']:.4f}, top-1 {m['best_test_top1']:.2f}%"
    if stopped == "patience":
        assert (f"stopped because the test loss had not improved for 1 epoch since epoch {int(m['best_epoch'])} "
                f"({best}); the cap of 3 epochs (`pre_epochs`) is an upper bound") in section
    else:
        assert "all of its cap of 3 epochs (`pre_epochs`)" in section and best in section
    assert "](pretrain_curves.png)" in section
    check_png(os.path.join(pretrained_store["folder"], "pretrain_curves.png"))


def test_controlled_timing_through_mlflow(pretrained_store):
    text, timed = pretrained_store["text"], pretrained_store["timed"]
    t3 = table(text, 3)
    median, lo, hi = (f"{x * 1e3:,.1f}" for x in timed[("rand", 1)])
    assert t3["1x"]["Rand"] == f"{median} [{lo}–{hi}] †" == t3["1x"]["GraSP"]
    median, lo, hi = (f"{x * 1e3:,.1f}" for x in timed[("mag", 10)])
    assert t3["10x"]["Mag"] == f"{median} [{lo}–{hi}]"
    assert t3["10x"]["SNIP"] == "—*"  # test_time logged, timed_test_time not: not mixed in
    assert ("Measured: median of 3 rounds, cells interleaved, each network rebuilt from its run's masks, batch 50, "
            "2 threads, device cpu-test, precision "
            "fp32; load average 0.25 when it started (2026-01-01T00:00:00+00:00).") in text
    assert "[ResNet20 · SNIP · 10x]: timed_test_time not logged" in text
    found = text.split("## Findings", 1)[1]
    assert "Testing times below are `timed_test_time`" in found
    measured = timed[("rand", 1)][0] / timed[("mag", 10)][0]
    assert "[ResNet20 · Mag · 10x]: FLOPs predict" in found and f"is a {measured:.2f}x speedup" in found
    expected = {"accuracy_vs_compression.png", "test_time_vs_compression.png", "flops_vs_compression.png",
                "layer_density.png", "weight_histograms_snip.png", "weight_histograms_mag.png", "loss_curves.png",
                "pretrain_curves.png"}
    assert {f for f in os.listdir(pretrained_store["folder"]) if f.endswith(".png")} == expected


def test_an_imported_pretraining_is_trained_again_and_both_are_in_the_report(pretrained_store, tmp_path, new_store,
                                                                              monkeypatch):
    """Exports carry no weights: a Magnitude job in the store an export was imported into
    pre-trains again; the report links the imported runs to the imported pre-training (by
    its original id) and says whether the two pre-trainings repeat each other."""
    from prunetrack import archive

    first = pretrained_store["client"].get_run(pretrained_store["runs"][("mag", 10)].data.tags["pretrain_run"])
    archive.export_runs("pre", str(tmp_path / "runs.jsonl"))
    uri = new_store(tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PRUNETRACK_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    mlflow.set_tracking_uri(uri)
    try:
        archive.import_runs(str(tmp_path / "runs.jsonl"))
        again = job("pre", pruner="mag", compression=5, pre_epochs=3, pre_patience=1)
        client = MlflowClient()
        second = client.get_run(client.get_run(again).data.tags["pretrain_run"])
        assert second.info.run_id != first.info.run_id and archive.IMPORTED_FROM not in second.data.tags
        opts = ReportOptions(experiment="pre", name="pre", output_dir=str(tmp_path / "reports"), models=["resnet20"],
                             compressions=[1, 5, 10])
        text = open(build_report(opts)).read()
    finally:
        mlflow.set_tracking_uri(None)
    section = text.split("## Pre-training (Magnitude)", 1)[1].split("## Findings")[0]
    # Mag at 5x prunes the second pre-training, at 10x the first: Table 2 marks the one unless
    # the two repeat each other exactly (the same weights), as the section says.
    mag_column = {r[0]: r[2] for r in rows(text, 2)}
    exact = "They repeat each other exactly" in section or "They hold the same weights, to the bit" in section
    assert mag_column["5x"].endswith(" ¶") != exact and "¶" not in mag_column["10x"], mag_column
    assert "does not hold" not in section
    assert "2 runs start from it" in section and "1 run starts from it" in section
    assert f"Pre-trained twice: {second.info.run_name} ({second.info.run_id[:8]}) has every setting of" in section
    assert "was imported from an export that carries no weights" in section
    assert exact or "They differ, by at most" in section or "Their weights differ (tag `weights_sha256`)" in section
