"""What the study needs from the report, on records built by hand: the dense cell shared
at 1x, the pre-training section, testing time from the controlled timing pass, the loss
curves' convergence in words, and the protocol stated from the runs."""
from __future__ import annotations

import os

from test_report import check_png
from test_report_split import make_run, rows

from prunetrack.report import Pretrain, ReportOptions, assemble, figures, findings, render, tables
from prunetrack.report.records import ACCURACY, FLOPS

PRE_ID = "feedface" + "0" * 24


def study(runs, pretrains=(), pruners=("rand", "mag", "snip", "grasp", "synflow"), **opts):
    options = ReportOptions(**{"experiment": "x", "models": ["resnet20"], "pruners": list(pruners),
                               "compressions": [1, 10], **opts})
    return assemble(options, runs, list(pretrains))


def mag(c, acc=60.0, **kw):
    return make_run("mag", c, metrics={"test_accuracy": acc}, tags={"pretrain_run": PRE_ID},
                    params={"pre_epochs": "200", "pre_patience": "20"}, **kw)


# ---------------------------------------------------------------------------- the dense cell at 1x

def test_dense_run_fills_the_empty_1x_cells_but_not_magnitudes():
    # SNIP's 1x ran on its own before (the same dense configuration): it keeps its run.
    dense = make_run("rand", 1, metrics={"test_accuracy": 80.0}, tags={"config_hash": "h0"})
    snip1 = make_run("snip", 1, metrics={"test_accuracy": 79.0}, tags={"config_hash": "h0"})
    s = study([dense, snip1, mag(1, 85.0), mag(10)])
    assert set(s.shared) == {("resnet20", "grasp", 1.0), ("resnet20", "synflow", 1.0)}
    assert rows("\n".join(tables.tables_section(s)), 2)[0] == ["1x", "80.00 †", "85.00", "79.00", "80.00 †", "80.00 †"]
    note = tables.shared_note(s, "resnet20")
    assert note == (f"† the dense network at 1x: nothing is pruned at 1x, so Rand, GraSP and SynFlow share one run "
                    f"(run {dense.label}); Magnitude's 1x starts from its pre-trained weights and is its own run.")
    assert f"<sub>{note}</sub>" in "\n".join(tables.tables_section(s))
    assert "no finished run" not in s.missing.get(("resnet20", "grasp", 1.0), set())
    assert s.missing[("resnet20", "mag", 10.0)] >= {"test_time not logged"}


def test_a_pretrained_dense_run_is_never_shared_and_never_the_baseline():
    s = study([mag(1, 85.0), mag(10), make_run("rand", 10, metrics={"test_accuracy": 50.0})])
    assert s.shared == {} and s.cell("resnet20", "rand", 1.0) == []
    base, runs = s.baseline("resnet20", "test_accuracy")
    assert base is None and runs == []
    assert "- No dense baseline" in "\n".join(findings.findings(s))
    assert "†" not in "\n".join(tables.tables_section(s))


def test_baseline_counts_the_shared_run_once_and_says_which_runs():
    dense = make_run("rand", 1, metrics={"test_accuracy": 80.0})
    m1 = mag(1, 85.0)
    s = study([dense, m1, mag(10, 70.0)])
    base, runs = s.baseline("resnet20", "test_accuracy")
    assert base.n == 1 and base.mean == 80.0 and runs == [dense]  # in four cells, counted once
    text = "\n".join(findings.findings(s))
    assert (f"- Dense baseline [ResNet20 · 1x]: 80.00% test accuracy, from 1 run of ResNet20 at 1x trained from "
            f"scratch ({dense.label}); left out: 1 run at 1x that starts from a pre-training, not the dense network "
            f"trained from scratch ({m1.label}).") in text
    # Magnitude is measured against its own pre-trained 1x, not the network trained from scratch.
    assert ("- Mag against its own 1x, pre-trained and trained unpruned, 85.00% [ResNet20 · Mag · 1x]: 10x 70.00% "
            "(-15.00, below by more than noise).") in text


def test_each_ratio_is_below_within_noise_or_above_the_dense_baseline():
    runs = [acc_run("rand", 80.0, c=1), acc_run("rand", 82.0, c=2), acc_run("rand", 79.5, c=10), mag(10, 86.0),
            acc_run("snip", 78.0, c=10)]
    text = "\n".join(findings.baseline_findings(study(runs, compressions=[1, 2, 10])))
    # 10,000 test images near 80%: 1.96 * sqrt(2 * .8 * .2 / 1e4) = 1.11 points.
    assert ("- Rand against the dense baseline, 80.00% [ResNet20 · 1x]: 2x 82.00% (+2.00, above by more than noise), "
            "10x 79.50% (-0.50, within noise); it is not below it by more than noise at any ratio run, up to 10x.") in text
    assert "- SNIP against the dense baseline, 80.00% [ResNet20 · 1x]: 10x 78.00% (-2.00, below by more than noise)." in text
    rand5 = acc_run("rand", 77.0, c=5)  # a ratio below noise, between two that are not
    text = "\n".join(findings.baseline_findings(study(runs + [rand5], compressions=[1, 2, 5, 10])))
    assert "5x 77.00% (-3.00, below by more than noise), 10x 79.50% (-0.50, within noise); it first falls below it " \
           "by more than noise at **5x**." in text
    # Without its own 1x, Magnitude is not set against the network trained from scratch as if it were like for like.
    assert ("- Mag starts from pre-trained weights, so its reference is its own 1x [ResNet20 · Mag · 1x] (the "
            "pre-trained network trained on unpruned), which has no finished run yet. Against the dense baseline "
            "(+6.00 points at 10x) the comparison is not like for like") in text


def test_two_seeds_of_the_dense_run_fill_a_cell_with_both():
    runs = [make_run("rand", 1, seed, metrics={"test_accuracy": 80.0 + seed}, tags={"config_hash": f"h{seed}"})
            for seed in (0, 1)]
    s = study(runs, pruners=("rand", "snip"))
    assert rows("\n".join(tables.tables_section(s)), 2)[0] == ["1x", "80.50 ± 0.71 (n=2) †", "80.50 ± 0.71 (n=2) †"]
    assert "share the same 2 runs" in tables.shared_note(s, "resnet20")


# ---------------------------------------------------------------------------- pre-training

def pretrain(stopped: str, epochs: int, best: int, patience: str = "20") -> Pretrain:
    metrics = {"epochs_run": epochs, "best_epoch": best, "best_test_loss": 0.41234, "best_test_top1": 88.5,
               "pretraining_time": 1234.4}
    history = {"train_loss": [(e, 2.0 / e) for e in range(1, epochs + 1)],
               "test_loss": [(e, 2.1 / min(e, best)) for e in range(1, epochs + 1)],
               "test_top1": [(e, 10.0 * min(e, 8)) for e in range(1, epochs + 1)]}
    return Pretrain(PRE_ID, "resnet20-pretrain-200ep-s0", {"pre_epochs": "200", "pre_patience": patience},
                    {"prunetrack.kind": "pretrain", "stopped": stopped}, metrics, history)


def test_pretraining_stopped_by_patience(tmp_path):
    s = study([make_run("rand", 10, metrics={"test_accuracy": 50.0}), mag(1), mag(10)], [pretrain("patience", 57, 37)])
    assert [p.id for p in s.pretrains] == [PRE_ID] and len(s.pretrains[0].users) == 2
    text = render.render(s, str(tmp_path))
    section = text.split("## Pre-training (Magnitude)", 1)[1].split("## Findings", 1)[0]
    assert ("Magnitude prunes the weights of one shared pre-training (run resnet20-pretrain-200ep-s0 (feedface); "
            "2 runs start from it): 57 epochs in 1234 s, stopped because the test loss had not improved for 20 "
            "epochs since epoch 37 (best test loss 0.4123, top-1 88.50%); the cap of 200 epochs (`pre_epochs`) is "
            "an upper bound, not the count trained.") in section
    assert "](pretrain_curves.png)" in section and (tmp_path / "pretrain_curves.png").exists()


def test_pretraining_that_ran_all_its_epochs():
    s = study([mag(10)], [pretrain("pre_epochs", 200, 196)])
    assert findings.pretrain_text(s)[0].endswith(
        ": 200 epochs in 1234 s, all of its cap of 200 epochs (`pre_epochs`), the test loss still improving within "
        "20 epochs (`pre_patience`); the pruned weights are those of epoch 196 (best test loss 0.4123, top-1 88.50%).")


def test_a_pretraining_repeated_in_another_precision_is_not_called_noise():
    first, again = pretrain("patience", 18, 13), pretrain("patience", 20, 15)
    first.tags.update(precision="bf16", **{"prunetrack.imported_from": "0ld"})
    again.id, again.tags["precision"] = "5ec0nd00", "fp32"
    text = findings.repeat_sentence(first, again)
    assert "They trained in different precisions (bf16, then fp32" in text and "noise" not in text
    again.tags["precision"] = "bf16"  # the same arithmetic: the curves decide
    text = findings.repeat_sentence(first, again)
    assert "They differ, by at most" in text and "marked ¶" in text and "devices" not in text
    first.tags["device"], again.tags["device"] = "cpu (AMD EPYC, AVX512, native bf16, 2 threads)", "cpu (Xeon, AVX512, native bf16, 2 threads)"
    assert (", having trained on different devices (`cpu (AMD EPYC, AVX512, native bf16, 2 threads)` for "
            "resnet20-pretrain-200ep-s0 (feedface), `cpu (Xeon, AVX512, native bf16, 2 threads)` for "
            "resnet20-pretrain-200ep-s0 (5ec0nd00)), "
            "whose kernels need not round alike:") in findings.repeat_sentence(first, again)


def test_cells_pruned_from_a_repeated_pretraining_are_marked_and_not_compared_as_like_for_like():
    """Mag cells made where the first pre-training's weights were not at hand prune a second
    one: Tables 1, 2 and 4 mark them, and the findings say when a cell and its 1x prune
    different pre-trainings."""
    first, again = pretrain("patience", 18, 13), pretrain("patience", 20, 15)
    first.tags.update(pretrain_hash="p0", **{"prunetrack.imported_from": "0ld"})
    again.id, again.tags["pretrain_hash"] = "5ec0nd00" + "0" * 24, "p0"
    late = {"pretrain_run": again.id}
    runs = [make_run("rand", 1, metrics={"test_accuracy": 80.0, "flops_effective": 8e7}),
            mag(1, 85.0), mag(10, 84.0),
            make_run("mag", 20, metrics={"test_accuracy": 82.0, "flops_effective": 4e6}, tags=late,
                     params={"pre_epochs": "200", "pre_patience": "20"})]
    s = study(runs, [first, again], compressions=[1, 10, 20])
    text = "\n".join(tables.tables_section(s))
    assert [r[2] for r in rows(text, 2)] == ["85.00", "84.00", "82.00 ¶"]
    assert [r[2] for r in rows(text, 4)][2] == "4.0 ¶"
    assert "¶" not in "".join(r[2] for r in rows(text, 3))
    assert (f"<sub>¶ pruned from another pre-training than the other cells of its pruner ({again.label}, where the "
            f"others prune {first.label}, with every setting alike; 1 run: resnet20-mag-20x-s0 (mag20s00)): the "
            "pre-training was repeated") in text
    mag_line = next(line for line in findings.baseline_findings(s) if line.startswith("- Mag against"))
    at10, at20 = mag_line.split("10x 84.00% (-1.00, ")[1].split("20x 82.00% (-3.00, ")
    assert "pre-training" not in at10 and at20.startswith("below by more than noise, pruned from another pre-training than its 1x (¶));")
    assert "the Magnitude runs of the repeat (marked ¶) prune other weights than those of the first" in \
        "\n".join(findings.pretrain_text(s))
    # Cells redone from the repeat, one after another: once most prune it, the first's are the marked ones.
    runs[1].tags.update(late)
    runs[2].tags.update(late)
    s = study(runs, [first, again], compressions=[1, 10, 20])
    text = "\n".join(tables.tables_section(s))
    assert [r[2] for r in rows(text, 2)] == ["85.00", "84.00", "82.00"]
    # A pre-training no cell prunes any more is left out: the section shows the one in use.
    assert findings.pretrain_text(s)[0].startswith("Magnitude prunes the weights of one shared pre-training (run "
                                                   f"{again.label};")
    runs[2].tags["pretrain_run"] = first.id
    s = study(runs, [first, again], compressions=[1, 10, 20])
    text = "\n".join(tables.tables_section(s))
    assert [r[2] for r in rows(text, 2)] == ["85.00", "84.00 ¶", "82.00"]
    assert f"({first.label}, where the others prune {again.label}, with every setting alike; 1 run: " in text
    assert ("the Magnitude runs of the first (marked ¶: fewer cells prune it) prune other weights than those of the "
            "repeat") in "\n".join(findings.pretrain_text(s))
    # One pre-training for every cell: no mark, no note.
    s = study(runs[:3], [first], compressions=[1, 10, 20])
    assert "¶" not in "\n".join(tables.tables_section(s) + findings.baseline_findings(s))


def test_cells_pruned_from_an_exact_repeat_of_the_pretraining_are_not_marked():
    """Training here is deterministic, also across CPUs: a pre-training repeated with every
    curve equal at every epoch holds the same weights as the first, so the cells pruned from
    it compare like for like, and the Pre-training section says why they carry no mark. A
    repeat equal where both logged but longer is not exact."""
    first, again = pretrain("patience", 18, 13), pretrain("patience", 18, 13)
    first.tags.update(pretrain_hash="p0", **{"prunetrack.imported_from": "0ld"})
    again.id, again.tags["pretrain_hash"] = "5ec0nd00" + "0" * 24, "p0"
    runs = [make_run("rand", 1, metrics={"test_accuracy": 80.0, "flops_effective": 8e7}), mag(1, 85.0), mag(10, 84.0),
            make_run("mag", 20, metrics={"test_accuracy": 82.0, "flops_effective": 4e6},
                     tags={"pretrain_run": again.id}, params={"pre_epochs": "200", "pre_patience": "20"})]
    s = study(runs, [first, again], compressions=[1, 10, 20])
    assert [r[2] for r in rows("\n".join(tables.tables_section(s)), 2)] == ["85.00", "84.00", "82.00"]
    assert "¶" not in "\n".join(findings.baseline_findings(s))
    section = "\n".join(findings.pretrain_text(s))
    assert ("They repeat each other exactly (train_loss, test_loss and test_top1 equal at all 18 epochs), so the "
            "Magnitude runs of both prune the same weights and compare like for like.") in section
    # Equal for 18 epochs, then the repeat went on: another training, marked.
    longer = pretrain("patience", 20, 13)
    longer.id, longer.tags["pretrain_hash"] = again.id, "p0"
    s = study(runs, [first, longer], compressions=[1, 10, 20])
    assert [r[2] for r in rows("\n".join(tables.tables_section(s)), 2)][2] == "82.00 ¶"
    assert "Their curves are equal at the 18 epochs both logged, but one logged more epochs" in \
        "\n".join(findings.pretrain_text(s))
    # Where both logged the digest of their weights, it decides, whatever the curves say.
    first.tags["weights_sha256"], again.tags["weights_sha256"] = "ab" * 32, "cd" * 32
    s = study(runs, [first, again], compressions=[1, 10, 20])
    assert [r[2] for r in rows("\n".join(tables.tables_section(s)), 2)][2] == "82.00 ¶"
    assert "Their weights differ (tag `weights_sha256`)" in "\n".join(findings.pretrain_text(s))
    longer.tags["weights_sha256"] = first.tags["weights_sha256"]
    s = study(runs, [first, longer], compressions=[1, 10, 20])
    assert [r[2] for r in rows("\n".join(tables.tables_section(s)), 2)][2] == "82.00"
    assert "They hold the same weights, to the bit (tag `weights_sha256`)" in "\n".join(findings.pretrain_text(s))


def test_a_dense_run_that_repeats_the_pretraining_is_compared_with_it():
    pre = pretrain("patience", 12, 8)
    pre.params.update(optimizer="adam", lr="0.001", batch_size="128", weight_decay="0.0", lr_drops="")
    pre.tags.update(model="resnet20", seed="0", precision="bf16", resumed_at_epoch="5")
    dense = make_run("rand", 1, metrics={"test_accuracy": 70.0})
    dense.histories = {k: v[:10] for k, v in pre.histories.items()}  # the same numbers, 10 epochs of them
    other_seed = make_run("rand", 1, 1, metrics={"test_accuracy": 71.0})
    s = study([dense, other_seed, make_run("snip", 10, metrics={"test_accuracy": 60.0}), mag(10)], [pre])
    assert s.twins(pre) == [dense]
    assert findings.pretrain_text(s)[2] == (
        f"Reproducibility: the dense run {dense.label} has every setting of this pre-training (model, seed, data, "
        "optimizer, precision) and prunes nothing, so its 10 epochs should repeat the pre-training's. They do, "
        "exactly: train_loss, test_loss and test_top1 are equal at every epoch. Training here is deterministic, and "
        "resuming from a checkpoint (last: resnet20-pretrain-200ep-s0 at epoch 5) does not change it.")
    dense.histories["test_top1"] = [(e, v + 0.01 * (e == 3)) for e, v in dense.histories["test_top1"]]
    assert "They differ, by at most 0.01 in test_top1 (the largest gap" in findings.pretrain_text(s)[2]
    assert "not bit-for-bit repeatable here" in findings.pretrain_text(s)[2]
    pre.tags["device"], dense.tags["device"] = "cpu (Xeon, AVX512, native bf16, 2 threads)", "cpu (EPYC, AVX2, 2 threads)"
    # another processor's kernels: a gap says nothing about determinism on one
    assert "the kernels of different processors need not round alike" in findings.pretrain_text(s)[2]
    assert "not bit-for-bit repeatable" not in findings.pretrain_text(s)[2]
    dense.tags["device"] = "cpu (x86_64, 2 threads)"  # an older tag: which processor is unknown, so no verdict
    assert "do not tell whether they trained on one kind of processor" in findings.pretrain_text(s)[2]
    assert "not bit-for-bit repeatable" not in findings.pretrain_text(s)[2]
    assert "different processors" not in findings.pretrain_text(s)[2]
    dense.tags["device"] = pre.tags["device"] = "cpu (Xeon, AVX512, native bf16 (AMX), 2 threads)"
    assert "not bit-for-bit repeatable here" in findings.pretrain_text(s)[2]
    dense.params["lr"] = "0.01"  # another setting: not a repetition, nothing to compare
    assert s.twins(pre) == [] and len(findings.pretrain_text(s)) == 2

def test_no_pretraining_is_one_line(tmp_path):
    s = study([make_run("rand", 10, metrics={"test_accuracy": 50.0})])
    assert findings.pretrain_text(s) == ["No run of ResNet20 starts from a pre-training run (no run has a "
                                         "`pretrain_run` tag).", ""]
    section = render.render(s, str(tmp_path)).split("## Pre-training (Magnitude)", 1)[1].split("## Findings")[0]
    assert "pretrain_curves.png" not in section and not (tmp_path / "pretrain_curves.png").exists()
    unknown = study([mag(10)])  # linked, but not among the experiment's pre-training runs
    assert unknown.pretrain_missing == [PRE_ID] and PRE_ID in findings.pretrain_text(unknown)[0]


# ---------------------------------------------------------------------------- testing time

TIMING = {"timing.rounds": "5", "timing.threads": "2", "timing.device": "cpu (x86_64, 2 threads)",
          "timing.batch_size": "256", "timing.precision": "bf16", "timing.loadavg": "0.08",
          "timing.when": "2026-01-02T03:04:05+00:00"}


def timed(pruner, c, median, lo, hi, seed=0):
    return make_run(pruner, c, seed, metrics={"test_accuracy": 70.0, "test_time": 9.0, "timed_test_time": median,
                                              "timed_test_time_min": lo, "timed_test_time_max": hi,
                                              "flops_dense": 80e6, "flops_effective": 8e6 if c > 1 else 80e6},
                    tags=TIMING)


def test_controlled_timing_is_used_with_its_spread_and_conditions():
    runs = [timed("rand", 1, 0.100, 0.095, 0.120), timed("rand", 10, 0.050, 0.048, 0.060),
            timed("rand", 10, 0.060, 0.055, 0.070, seed=1),
            make_run("snip", 10, metrics={"test_accuracy": 60.0, "test_time": 0.01})]
    s = study(runs, pruners=("rand", "snip"))
    assert s.time_metric.key == "timed_test_time"
    text = "\n".join(tables.tables_section(s))
    assert rows(text, 3) == [["1x", "100.0 [95.0–120.0] †", "100.0 [95.0–120.0] †"],
                             ["10x", "55.0 ± 7.1 (n=2) [48.0–70.0]", "—*"]]
    assert ("one column per pruner. Measured: median of 5 rounds, cells interleaved, each network rebuilt from "
            "its run's masks, batch 256, 2 threads, device "
            "cpu (x86_64, 2 threads), precision bf16; load average 0.08 when it started "
            "(2026-01-02T03:04:05+00:00).") in text
    assert s.missing[("resnet20", "snip", 10.0)] >= {"timed_test_time not logged"}
    found = "\n".join(findings.speedup_findings(s))
    assert "Testing times below are `timed_test_time`" in found
    assert "measured testing time 55.0 ms vs 100.0 ms dense [ResNet20 · 1x] is a 1.82x speedup (18% of the " \
           "predicted)." in found  # ranges [48-70] and [95-120] apart


def test_a_cell_timed_on_another_machine_or_precision_is_marked_in_table_3():
    runs = [timed("rand", 1, 8.3, 8.2, 8.5), timed("rand", 10, 8.2, 8.1, 8.4), timed("snip", 10, 37.5, 36.9, 39.0)]
    runs[2].tags.update({"timing.device": "cpu (Some CPU, AVX2, 2 threads)", "timing.precision": "fp32"})
    text = "\n".join(tables.tables_section(study(runs, pruners=("rand", "snip"))))
    assert rows(text, 3) == [["1x", "8.30 [8.20–8.50] †", "8.30 [8.20–8.50] †"],
                             ["10x", "8.20 [8.10–8.40]", "37.50 [36.90–39.00] §"]]
    assert ("<sub>§ timed on another device or in another precision than most cells: device cpu (Some CPU, AVX2, "
            "2 threads), precision fp32 (resnet20-snip-10x-s0 (snip10s0)). Such a time measures the machine") in text
    assert text.count("§") == 2  # the cell and its note, under Table 3 only
    runs[2].tags.update({k: runs[0].tags[k] for k in ("timing.device", "timing.precision")})
    assert "§" not in "\n".join(tables.tables_section(study(runs, pruners=("rand", "snip"))))


def test_the_figures_leave_out_times_from_another_machine_and_draw_other_precisions_hollow(tmp_path):
    # The study resumed on an AVX2 machine: SNIP's 10x trained and was timed there in fp32.
    runs = [timed("rand", 1, 8.3, 8.2, 8.5), timed("rand", 10, 8.2, 8.1, 8.4), timed("snip", 10, 37.5, 36.9, 39.0)]
    runs[2].tags.update({"timing.device": "cpu (Some CPU, AVX2, 2 threads)", "timing.precision": "fp32",
                         "precision": "fp32"})
    s = study(runs, pruners=("rand", "snip"))
    time_curves = figures.curves(s, s.time_metric)
    assert {p: [(c, st.mean, h) for c, st, h in pts] for p, pts in time_curves.points.items()} == \
        {"rand": [(1, 8.3, False), (10, 8.2, False)], "snip": [(1, 8.3, False)]}
    assert time_curves.left_out == [("snip", 10)]
    accuracy = figures.curves(s, ACCURACY)
    assert [(c, h) for c, _, h in accuracy.points["snip"]] == [(1, False), (10, True)]
    assert not figures.curves(s, FLOPS).left_out
    captions = dict(figures.draw(s, str(tmp_path)))
    check_png(tmp_path / "test_time_vs_compression.png")
    assert captions["test_time_vs_compression.png"].endswith(
        " Left out: SNIP at 10x, timed on another device or in another precision than the others (§ in Table 3), "
        "whose times would measure the machine rather than the network.")
    assert captions["accuracy_vs_compression.png"].endswith(
        " Hollow markers: cells trained in another precision than the study's bf16 (‡ in Tables 1-2).")
    assert "Left out" not in captions["accuracy_vs_compression.png"] + captions["flops_vs_compression.png"]
    # Timed in one pass on one machine: every cell is drawn.
    runs[2].tags.update({k: runs[0].tags[k] for k in ("timing.device", "timing.precision", "precision")})
    s = study(runs, pruners=("rand", "snip"))
    assert not figures.curves(s, s.time_metric).left_out
    assert "Left out" not in dict(figures.draw(s, str(tmp_path)))["test_time_vs_compression.png"]


def test_testing_times_of_a_second_and_more_are_in_seconds():
    s = study([timed("rand", 1, 10.1885, 10.1051, 10.2754), timed("rand", 10, 10.0952, 10.0855, 10.1836)],
              pruners=("rand",))
    text = "\n".join(tables.tables_section(s))
    assert "**Table 3.** Testing time (s, whole test set;" in text
    assert rows(text, 3) == [["1x", "10.19 [10.11–10.28]"], ["10x", "10.10 [10.09–10.18]"]]
    assert ("measured testing time 10.10 s vs 10.19 s dense [ResNet20 · 1x] is a 1.01x speedup (10% of the predicted); "
            "its rounds' range overlaps the dense network's, so no speedup is measurable.") in \
        "\n".join(findings.speedup_findings(s))

def test_cells_without_a_measurable_speedup_are_one_sentence():
    # Three pruned cells whose rounds overlap the dense network's, one that is measurably faster.
    runs = [timed("rand", 1, 9.05, 9.02, 9.19), timed("rand", 10, 9.15, 9.06, 9.19), timed("snip", 10, 9.09, 9.02, 9.33),
            timed("rand", 20, 9.0, 8.9, 9.1), timed("snip", 20, 6.0, 5.9, 6.1)]
    s = study(runs, pruners=("rand", "snip"), compressions=[1, 10, 20])
    found = findings.speedup_findings(s)
    assert found[1].startswith("- [ResNet20 · SNIP · 20x]: FLOPs predict a 10.00x speedup; measured testing time "
                               "6.00 s vs 9.05 s dense [ResNet20 · 1x] is a 1.51x speedup (15% of the predicted).")
    assert found[2] == (
        "- No measurable speedup in 3 of 4 pruned cells (Rand at 10, 20x and SNIP at 10x): FLOPs predict 10.00x "
        "speedups; measured testing times of 9.00-9.15 s vs 9.05 s dense [ResNet20 · 1x] are 0.99-1.01x speedups, "
        "and each cell's range over its rounds overlaps the dense network's. The masks zero weights inside dense "
        "tensors, so inference still runs the dense convolutions: fewer FLOPs need sparse kernels or structured "
        "(channel) pruning to become time.")
    assert len(found) == 3
    # All of them: counted, not listed.
    s = study(runs[:3], pruners=("rand", "snip"))
    assert findings.speedup_findings(s)[1].startswith("- No measurable speedup in both pruned cells of ResNet20: ")


def test_cells_timed_in_several_passes_say_so():
    later = timed("rand", 10, 0.050, 0.048, 0.060)
    later.tags.update({"timing.when": "2026-01-05T00:00:00+00:00", "timing.loadavg": "0.30"})
    s = study([timed("rand", 1, 0.100, 0.095, 0.120), timed("snip", 10, 0.052, 0.05, 0.06), later],
              pruners=("rand", "snip"))
    assert ("precision bf16; in 2 passes, each interleaving only its own runs: 2 runs at 2026-01-02T03:04:05+00:00 "
            "(load average 0.08); 1 run at 2026-01-05T00:00:00+00:00 (load average 0.30). Runs of different passes "
            "compare less well than runs of one pass.") in "\n".join(tables.tables_section(s))
    # Only the cell timed in the dense network's pass is compared with it.
    found = findings.speedup_findings(s)
    assert found[1].startswith("- [ResNet20 · SNIP · 10x]: FLOPs predict a 10.00x speedup; measured testing time 52.0 ms")
    assert found[2] == ("- Not compared with the dense network: [ResNet20 · Rand · 10x] was timed in another pass than "
                        "it, and passes differ by more than their rounds' spread (FLOPs predict 10.00x speedups); "
                        "`prunetrack time` without `--untimed` times every cell in one pass.")
    assert len(found) == 3

def test_without_the_timing_pass_the_jobs_times_are_flagged():
    s = study([make_run("rand", 10, metrics={"test_accuracy": 50.0, "test_time": 0.02})], pruners=("rand",))
    assert s.time_metric.key == "test_time"
    text = "\n".join(tables.tables_section(s))
    assert rows(text, 3)[1] == ["10x", "20.0"]
    assert ("These are the jobs' own `test_time`, measured while training shared the machine: they are not "
            "comparable across cells.") in text


# ---------------------------------------------------------------------------- loss curves and settings

def test_loss_curves_in_words():
    test = [2.0, 1.6, 1.3, 1.1, 1.0, 0.95, 0.93, 0.92, 0.925, 0.94]
    run = make_run("rand", 10, metrics={"test_accuracy": 50.0},
                   histories={"test_loss": list(enumerate(test, 1)), "train_loss": [(e, 0.5) for e in range(1, 11)]})
    short = make_run("snip", 10, metrics={"test_accuracy": 50.0},
                     histories={"test_loss": [(1, 2.0), (2, 1.5)], "train_loss": [(1, 2.0), (2, 1.4)]})
    s = study([run, short], pruners=("rand", "snip"))
    assert findings.loss_findings(s) == [
        "- Loss curves, Rand at 10x [ResNet20 · Rand · 10x]: test loss lowest at epoch 8 of 10 (0.9200); over the "
        "last 3 epochs (epoch 7 to 10) it changed by +1.1%, to 0.9400; train loss 0.5000 at epoch 10.",
        "- Loss curves, SNIP at 10x [ResNet20 · SNIP · 10x]: test loss lowest at epoch 2 of 2 (1.5000); over the "
        "last 1 epoch (epoch 1 to 2) it changed by -25.0%, to 1.5000; train loss 1.4000 at epoch 2."]


def test_loss_still_falling_for_every_pruner_is_called_not_levelled_off():
    def falling(pruner, drop):
        test = [2.0, 1.5, 1.2, 1.0, 0.9, 0.85, 0.8, 0.8 * (1 - drop / 3), 0.8 * (1 - 2 * drop / 3), 0.8 * (1 - drop)]
        return make_run(pruner, 10, metrics={"test_accuracy": 50.0}, histories={"test_loss": list(enumerate(test, 1))})

    s = study([falling("rand", 0.09), falling("snip", 0.25)], pruners=("rand", "snip"))
    assert findings.loss_findings(s)[-1] == (
        "- Not levelled off: at 10x the test loss of every pruner was still at its lowest on the last epoch and had "
        "fallen by 9.0%-25.0% over the last 3 epochs, so the accuracies compare the pruners after an equal, short "
        "training budget, not at convergence.")
    one = study([falling("rand", 0.09), falling("snip", 0.01)], pruners=("rand", "snip"))
    assert findings.loss_findings(one)[-1] == (
        "- Not levelled off: at 10x the test loss of Rand was still at its lowest on the last epoch and had fallen by "
        "9.0% over the last 3 epochs, so their accuracies are measured after an equal, short training budget, not at "
        "convergence.")
    levelled = study([falling("rand", 0.01), falling("snip", 0.01)], pruners=("rand", "snip"))
    assert not findings.loss_findings(levelled)[-1].startswith("- Not levelled off")


def test_settings_state_the_protocol_from_the_runs(tmp_path):
    runs = [make_run("rand", 1, metrics={"test_accuracy": 80.0}),
            make_run("synflow", 10, metrics={"test_accuracy": 60.0}), mag(10)]
    text = render.render(study(runs), str(tmp_path)).split("## Settings", 1)[1].split("## Tables", 1)[0]
    assert ("**Protocol** (the most common value among the runs; ⚠ below marks any that differ): optimizer adam; "
            "lr 0.001; batch size 128; weight decay 0; lr drops none; 10 training epochs after pruning "
            "(`post_epochs`); pruning data 10 examples per class; global scope; SynFlow 100 iterations; precision "
            "bf16; data: synthetic (generated). Pre-training (Magnitude): at most 200 epochs (`pre_epochs`, a cap), "
            "stopping once the test loss has not improved for 20 epochs (`pre_patience`; 0: never).") in text
    assert "- **Precision**: `bf16`" in text  # the tag, not the param's "auto"
    assert "- **Pre-training epochs (cap)** (runs that start from a pre-training: Mag): `200`" in text
    assert "- **Pre-training epochs (cap)** (the other runs): `0`" in text
    assert "differs between runs" not in text  # one protocol: nothing flagged


def test_the_study_rows_are_the_vgg16_the_runs_used_and_resnet50():
    runs = [make_run("rand", 10, model="vgg16_bn", metrics={"test_accuracy": 80.0})]
    assert study(runs, models=None).models == ["vgg16_bn", "resnet50"]  # no empty row for plain vgg16
    runs.append(make_run("rand", 10, model="vgg16", metrics={"test_accuracy": 10.0}))
    assert study(runs, models=None).models == ["vgg16_bn", "vgg16", "resnet50"]
    assert study([make_run("rand", 10, metrics={"test_accuracy": 80.0})], models=None).models == \
        ["vgg16_bn", "resnet50", "resnet20"]

def test_a_missing_cells_command_carries_its_pruners_own_settings(tmp_path):
    # Magnitude's cells start from a pre-training and SynFlow's prune in 100 rounds; the other
    # pruners' runs set neither, and their commands must not either.
    runs = [make_run("rand", 10, metrics={"test_accuracy": 80.0}), make_run("snip", 10),
            make_run("synflow", 10), mag(10)]
    text = render.render(study(runs, pruners=("rand", "snip", "synflow", "mag")), str(tmp_path))
    missing = text.split("## Missing cells", 1)[1]
    command = lambda pruner: next(ln for ln in missing.splitlines() if f"-P pruner={pruner} -P compression=1 " in ln)
    assert command("mag").strip() == ("`mlflow run . --env-manager local -e prune --experiment-name x -P model=resnet20 "
                                      "-P pruner=mag -P compression=1 -P dataset=synthetic -P batch_size=128 "
                                      "-P pre_epochs=200 -P pre_patience=20`")
    assert "pre_epochs" not in command("rand") and "iterations" not in command("rand")
    assert "-P iterations" not in command("synflow")  # 100 is SynFlow's default
    # Tables 1-4 hold ResNet20 at 1x and 10x for 4 pruners: the 10x row ran (two runs without accuracy count).
    assert ("**Coverage**: the cells of Tables 1-4 with a finished run: ResNet20 4 of 8; the others are listed, each "
            "with the command that fills it, under [Missing cells](#missing-cells).") in text

def test_runs_from_other_commits_are_listed_but_not_flagged_as_another_protocol(tmp_path):
    runs = [make_run("rand", 10, metrics={"test_accuracy": 80.0}, tags={"git_commit": "aaa111"}),
            make_run("snip", 10, metrics={"test_accuracy": 81.0}, tags={"git_commit": "bbb222"})]
    text = render.render(study(runs), str(tmp_path)).split("## Settings", 1)[1].split("## Tables", 1)[0]
    assert "- **Git commit**: differs between runs: `aaa111` in 1 run " in text
    assert "⚠" not in text.replace("⚠ below marks any that differ", "")
    assert ("The runs were made by more than one software version (Git commit): listed, not flagged, since a "
            "version is not a protocol setting; every protocol setting above agrees; `git log` between the commits "
            "shows what changed.") in text
    # A study resumed on another machine: the device is listed too, and not flagged either.
    runs[1].tags["device"] = "cpu (Some CPU 7000, AVX2, 2 threads)"
    text = render.render(study(runs), str(tmp_path)).split("## Settings", 1)[1].split("## Tables", 1)[0]
    assert "- **Device**: differs between runs: " in text and "⚠" not in text.replace("⚠ below marks", "")
    assert ("The runs were made by more than one software version (Git commit) and on more than one device: listed, "
            "not flagged, since neither is a protocol setting; every protocol setting above agrees;") in text
    # A protocol setting that differs is still flagged, beside the versions.
    runs[1].params["lr"] = "0.01"
    text = render.render(study(runs), str(tmp_path)).split("## Settings", 1)[1].split("## Tables", 1)[0]
    assert "- **Learning rate**: ⚠ differs between runs" in text
    assert "⚠ 1 setting(s) differ between runs" in text and "the ⚠ settings aside, the protocol agrees" in text


def test_a_study_made_over_many_commits_counts_their_runs_rather_than_naming_them(tmp_path):
    """A study run in pieces collects a commit or two per piece: the Settings line says how
    many runs each (short) commit made, so that it stays readable, and names the runs only
    where there are few commits."""
    commits = [c * 40 for c in "abcd"]
    runs = [make_run(p, 10, metrics={"test_accuracy": 80.0}, tags={"git_commit": c})
            for p, c in zip(("rand", "snip", "grasp", "synflow"), commits)]
    runs.append(make_run("rand", 1, metrics={"test_accuracy": 85.0}, tags={"git_commit": commits[0]}))
    text = render.render(study(runs, pruners=("rand", "snip", "grasp", "synflow")), str(tmp_path))
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Git commit**"))
    assert line == ("- **Git commit**: differs between runs (4 values, each run's `git_commit` tag names its own): "
                    "`aaaaaaaaaaaa` in 2 runs; `bbbbbbbbbbbb` in 1 run; `cccccccccccc` in 1 run; "
                    "`dddddddddddd` in 1 run")
    runs = [r for r in runs if r.tags["git_commit"] in commits[:2]]
    text = render.render(study(runs, pruners=("rand", "snip")), str(tmp_path))
    line = next(ln for ln in text.splitlines() if ln.startswith("- **Git commit**"))
    assert line.startswith("- **Git commit**: differs between runs: `aaaaaaaaaaaa` in 2 runs (resnet20-"), line


def test_cells_trained_in_another_precision_are_marked_where_their_accuracy_is_compared(tmp_path):
    # A study resumed on a machine without native bf16: one cell trained in fp32, the rest in bf16.
    runs = [make_run("rand", 1, metrics={"test_accuracy": 85.0}),
            acc_run("rand", 80.0), acc_run("snip", 79.5), acc_run("grasp", 78.0, precision="fp32")]
    s = study(runs, pruners=("rand", "snip", "grasp"))
    text = render.render(s, str(tmp_path))
    assert "- **Precision**: ⚠ differs between runs: `bf16` in 3 runs" in text
    assert rows(text, 2) == [["1x", "85.00 †", "85.00 †", "85.00 †"], ["10x", "80.00", "79.50", "78.00 ‡"]]
    assert rows(text, 1) == [["ResNet20", "80.00", "79.50", "78.00 ‡"]]
    note = ("<sub>‡ trained in another precision than the study's bf16: fp32 (1 run: resnet20-grasp-10x-s0 "
            "(grasp10s)). A precision changes the arithmetic of training")
    assert text.count(note) == 2  # under the two accuracy tables, not under FLOPs or testing time
    assert "‡" not in "".join(c for row in rows(text, 3) + rows(text, 4) for c in row)
    ranking = findings.ranking_findings(s)[1]
    assert ranking.endswith("; GraSP trained in fp32, the others in bf16, so its gap to the others includes a "
                            "change of precision.")
    grasp = next(line for line in findings.baseline_findings(s) if line.startswith("- GraSP against"))
    assert "10x 78.00% (-7.00, below by more than noise, trained in fp32)" in grasp
    # Every cell compared at a ratio trained in the other precision: within the ratio the gaps hold
    # one arithmetic, so no gap is said to include a change of precision.
    both = [make_run("rand", 1, metrics={"test_accuracy": 85.0}), acc_run("rand", 80.0),
            acc_run("rand", 81.0, c=5, precision="fp32"), acc_run("snip", 79.0, c=5, precision="fp32")]
    ranking = findings.ranking_findings(study(both, pruners=("rand", "snip"), compressions=[1, 5, 10]))[1]
    assert ranking.startswith("- At 5x") and "includes a change of precision" not in ranking
    assert ranking.endswith("; both trained in fp32, not the study's bf16: one precision within this ratio, "
                            "another than most cells of the others.")
    # Seeds trained in the other precision beside a seed in the study's: the cells mix the two,
    # so the clause does not call the ratio one precision.
    mixed = both + [acc_run("rand", 80.5, seed=1, c=5), acc_run("snip", 79.5, seed=1, c=5)]
    ranking = findings.ranking_findings(study(mixed, pruners=("rand", "snip"), compressions=[1, 5, 10]))[1]
    assert ranking.endswith("; runs of Rand and SNIP trained in fp32, the rest in bf16, so their gaps include "
                            "a change of precision.")
    # One precision throughout: no mark, no note, no caveat.
    runs[3].tags["precision"] = "bf16"
    text = render.render(study(runs, pruners=("rand", "snip", "grasp")), str(tmp_path))
    assert "‡" not in text and "change of precision" not in text


# ---------------------------------------------------------------------------- findings and noise

def acc_run(pruner, acc, seed=0, c=10, **tags):
    return make_run(pruner, c, seed, metrics={"test_accuracy": acc}, tags={"test_examples": "10000", **tags})


def test_single_seed_ranking_calls_gaps_below_the_test_sets_sampling_error_within_noise():
    # Near 80% on 10,000 images the 95% half-width of a difference is 1.96 * sqrt(2 * .8 * .2 / 1e4) = 1.11 points:
    # SNIP, 0.80 below Rand, is within it, GraSP, 3.00 below, is not.
    s = study([acc_run("rand", 80.0), acc_run("snip", 79.2), acc_run("grasp", 77.0)], pruners=("rand", "snip", "grasp"))
    noise, ranking = findings.ranking_findings(s)
    assert noise.startswith("- Noise: every cell is a single run (n=1), so the seed-to-seed spread is not measured")
    assert "10,000 test images: ±1.13 points, 95%, for two accuracies near 79%" in noise  # their mean, 78.73
    assert ranking == ("- At 10x [ResNet20 · 10x], n=1 per pruner: Rand 80.00%, SNIP 79.20%, GraSP 77.00%. "
                       "**Rand** is highest; SNIP is within noise of it (0.80 points); GraSP (3.00 points) is below "
                       "it by more than the test set's sampling error.")


def test_with_seeds_the_ranking_states_n_and_spread_and_uses_the_seed_spread():
    # Rand's three seeds have sd 2.0: twice the standard error of a 3-vs-1 difference is 2 * 2 * sqrt(4/3) = 4.62.
    runs = [acc_run("rand", v, seed) for seed, v in enumerate((78.0, 80.0, 82.0))]
    s = study(runs + [acc_run("snip", 76.0), acc_run("grasp", 74.0)], pruners=("rand", "snip", "grasp"))
    noise, ranking = findings.ranking_findings(s)
    assert "pooled over the 1 cell with several seeds ([ResNet20 · Rand · 10x]), is 2.00 points" in noise
    assert ranking.startswith("- At 10x [ResNet20 · 10x], n=1-3 per pruner: Rand 80.00% ± 2.00% (n=3), SNIP 76.00%")
    assert "SNIP is within noise of it (4.00 points); GraSP (6.00 points) is below it by more than the noise" in ranking


def test_near_collapse_and_disconnection_are_findings_not_no_collapse():
    layers = [{"layer": "classifier", "density": 0.0006}, {"layer": "features.0", "density": 0.5}]
    s = study([make_run("mag", 10, tags={"near_collapse": "classifier"}, layers=layers),
               make_run("snip", 10, tags={"disconnected": "true"})], pruners=("mag", "snip"))
    text = "\n".join(findings.layer_findings(s))
    assert "No layer collapse" not in text
    assert "Near collapse in [ResNet20 · Mag · 10x]" in text and "`classifier` keeps 0.06% of its weights" in text
    assert "Disconnected: [ResNet20 · SNIP · 10x]" in text
    clean = study([make_run("rand", 10)], pruners=("rand",))
    assert findings.layer_findings(clean)[-1].startswith("- No layer collapse, disconnection or near-collapse")


# ---------------------------------------------------------------------------- the training budget

def budget_run(pruner, epochs, top1, test_loss, seed=0):
    """A 10x run of `epochs` epochs whose test top-1 and test loss per epoch are given."""
    return make_run(pruner, 10, seed, metrics={"test_accuracy": top1[-1]}, tags={"test_examples": "10000"},
                    params={"post_epochs": str(epochs)},
                    histories={"test_top1": list(enumerate(top1, 1)), "test_loss": list(enumerate(test_loss, 1)),
                               "train_loss": [(e, 1.0 / e) for e in range(1, epochs + 1)]})


def test_runs_trained_longer_stay_out_of_the_tables_and_compare_the_budgets(tmp_path):
    # 10 epochs: SNIP 70 > Rand 65. The same cells at 30 epochs: Rand reaches 85, SNIP 80, so the order changes.
    ramp = lambda a, b, n: [a + (b - a) * e / (n - 1) for e in range(n)]
    short = [budget_run("rand", 10, ramp(30, 65, 10), ramp(2.0, 1.0, 10)),
             budget_run("snip", 10, ramp(30, 70, 10), ramp(2.0, 0.9, 10))]
    longer = [budget_run("rand", 30, ramp(30, 65, 10) + ramp(66, 85, 20), ramp(2.0, 1.0, 10) + ramp(0.95, 0.6, 20)),
              budget_run("snip", 30, ramp(30, 70.5, 10) + ramp(71, 80, 20), ramp(2.0, 0.9, 24) + [0.8] * 6)]
    s = study(short + longer, pruners=("rand", "snip"))
    assert s.budget == 10 and sorted(r.id for r in s.longer) == sorted(r.id for r in longer)
    assert [r.id for r in s.cell("resnet20", "rand", 10.0)] == [short[0].id]  # not averaged into the cell
    md = render.render(s, str(tmp_path))
    assert "- Not in the tables: 2 runs with another training budget (30 epochs; see Training budget)" in md
    section = md.split("## Training budget", 1)[1].split("## Findings", 1)[0]
    assert ("2 runs trained longer than the tables' 10 epochs, in cells the tables also hold; they are not in the "
            "tables. After 10 epochs, their test top-1 differs "
            "from the tables' runs of the same cell by 0.50 points at most.") in section
    assert rows(section, 7) == [["Rand at 10x", "65.00", "65.00", "75.00", "85.00", "+20.00", "30 of 30"],
                                ["SNIP at 10x", "70.00", "70.50", "75.26", "80.00", "+10.00", "25 of 30"]]
    assert "training_budget.png" in section
    check_png(os.path.join(tmp_path, "training_budget.png"))
    assert ("- Training budget at 10x [ResNet20 · 10x], n=1 per pruner: after 30 epochs Rand 85.00% > SNIP 80.00%; "
            "the same runs after 10 epochs: SNIP 70.50% > Rand 65.00%. The order changes (Rand and SNIP move). "
            "Training 20 epochs longer gained +9.50 to +20.00 points of top-1, so the tables compare the pruners "
            "after an equal budget of 10 epochs, not their accuracy at 30.") in section
    # Gains within the test set's sampling error (±1.1 points near 80%) do not say the budget was short.
    flat = [budget_run("rand", 30, ramp(30, 65, 10) + [65.5] * 20, ramp(2.0, 1.0, 30)),
            budget_run("snip", 30, ramp(30, 70, 10) + [70.4] * 20, ramp(2.0, 0.9, 30))]
    assert ("gained +0.40 to +0.50 points of top-1, so the tables compare the pruners after an equal budget of 10 "
            "epochs, within the test set's sampling error of their accuracy at 30.") in \
        render.render(study(short + flat, pruners=("rand", "snip")), str(tmp_path))
    # One pruner trained longer (the study's first 30-epoch cell): no order to compare, but its gain still tells
    # whether the tables' budget was short.
    md = render.render(study(short + longer[:1], pruners=("rand", "snip")), str(tmp_path))
    assert ("1 run trained longer than the tables' 10 epochs, in cells the tables also hold; it is not in the "
            "tables. After 10 epochs, its test top-1 equals that of the tables' run of the same cell: the first 10 epochs "
            "repeat it.") in md
    assert ("- Training budget at 10x [ResNet20 · 10x], n=1 per pruner: after 30 epochs Rand 85.00%; the same run "
            "after 10 epochs: Rand 65.00%. Training 20 epochs longer gained +20.00 points of top-1, so the tables "
            "compare the pruners after an equal budget of 10 epochs, not their accuracy at 30. Rand: test loss 1.000 "
            "after 10 epochs, lowest 0.600 at epoch 30; train loss 0.100 after 10, 0.033 after 30.") in md
    # Without longer runs there is no section.
    assert "## Training budget" not in render.render(study(short, pruners=("rand", "snip")), str(tmp_path))


def test_device_tags_differ_only_in_the_parts_both_name():
    new, old = "cpu (Xeon, AVX512, native bf16 (AMX), 2 threads)", "cpu (Xeon, AVX512, native bf16, 2 threads)"
    assert findings.same_device(new, new) is True
    assert findings.same_device(new, old) is None  # the older tag leaves the bf16 path out
    assert findings.same_device(old, old) is None
    assert findings.same_device(new, "cpu (Xeon, AVX512, native bf16 (AVX512-BF16), 2 threads)") is False
    assert findings.same_device(new, "cpu (Xeon, AVX512, native bf16 (AMX), ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, "
                                     "2 threads)") is False
    assert findings.same_device(new, "cpu (EPYC, AVX512, native bf16 (AMX), 2 threads)") is False
    assert findings.same_device(old, "cpu (Xeon, AVX2, 2 threads)") is False  # bf16 against none
    assert findings.same_device(new, "cpu (Xeon, AVX512, native bf16 (AMX), 4 threads)") is False
    assert findings.same_device("cpu (x86_64, 2 threads)", "cpu (x86_64, 2 threads)") is None
    assert findings.same_device("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3") is True
    assert findings.same_device("NVIDIA H100 80GB HBM3", new) is False


def test_device_parts_reads_what_the_jobs_write(monkeypatch):
    import torch

    from prunetrack import job, training
    monkeypatch.setattr(training, "cpu_bf16", lambda device: "AMX")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    parts = findings.device_parts(job.device_name(torch.device("cpu")))
    assert parts["bf16"] == "AMX" and parts["cap"] == "AVX512_CORE_BF16"
    assert parts["isa"] == torch.backends.cpu.get_cpu_capability() and parts["threads"].endswith(" threads")
