"""A whole job, end to end, against real MLflow stores."""
import os
import re
import subprocess
import sys

import mlflow
import pytest
import torch

from prunetrack import load_masks, masking, models, store, tracking, training
from prunetrack.config import JobConfig
from prunetrack.job import run_job
from tests.conftest import CROWD, REPO, SMOKE


def _job(**overrides):
    return JobConfig.from_flat({**SMOKE, "pruner": "mag", "compression": 10, "train_subset": 200,
                                "test_subset": 100, **overrides})


def _only_run():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    return runs[0]


def test_job_logs_the_whole_run(mlflow_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # the default is 10 s
    run_id = run_job(_job(post_epochs=2, experiment="smoke"))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.get_experiment(run.info.experiment_id).name == "smoke"
    p = run.data.params
    assert p["model"] == "resnet20" and p["pruner"] == "mag" and float(p["compression"]) == 10
    assert p["optimizer"] == "adam" and float(p["lr"]) == 1e-3 and p["iterations"] == "1"
    t = run.data.tags
    assert {t["model"], t["dataset"], t["pruner"], t["compression"]} == {"resnet20", "synthetic", "mag", "10"}
    assert t["device"].startswith("cpu") and t["git_commit"]
    client = mlflow.MlflowClient()
    for key in ("train_loss", "test_loss", "test_top1", "test_top5"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2]
    m = run.data.metrics
    prunable = m["params_prunable"]
    assert m["params_remaining"] == round(prunable / 10) and abs(m["density"] - 0.1) < 1e-3
    assert 0 <= m["test_accuracy"] <= 100 and m["pruning_time"] > 0 and m["training_time"] > 0
    assert m["test_time_min"] <= m["test_time"] <= m["test_time_max"] and m["test_time_threads"] >= 1
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "masks.pt", "layers.json"} <= artifacts
    # The run's Description in the UI: what it is, its result, and artifacts that are there.
    about = t["mlflow.note.content"]
    assert about.startswith("resnet20 on synthetic from a fresh initialization, pruned 10x by mag (global scope, "
                            f"1 round), then trained 2 epochs (adam, lr 0.001, {t['precision']})")  # auto: the machine's
    assert f"**test top-1 {m['test_accuracy']:.2f}%**" in about
    assert f"{int(m['params_remaining']):,} of {int(prunable):,} prunable weights kept" in about
    named = set(re.findall(r"`([\w.]+\.(?:pt|json|png|yaml))`", about))
    assert len(named) == 6 and named <= artifacts, named - artifacts
    # MLflow's system metrics, shown in the run's System metrics tab.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(m)

    # The logged masks load back and fit the model they came from.
    masks = load_masks(f"runs:/{run_id}")
    model = masking.add_masks(models.get_model("resnet20"))
    masking.set_masks(model, masks)
    assert masking.count(model) == (prunable, m["params_remaining"])


def test_description_names_the_dense_network_and_the_ablations():
    from prunetrack import job

    m = {"test_accuracy": 91.234, "params_remaining": 1000.0, "params_prunable": 1000.0, "flops_effective": 2e6,
         "flops_dense": 2e6}
    dense = job.description(job.resolve(_job(pruner="snip", compression=1)), "bf16", "", m)
    assert dense.startswith("resnet20 on synthetic from a fresh initialization, not pruned (compression 1: the "
                            "dense network), then trained 1 epoch (adam, lr 0.001, bf16): **test top-1 91.23%**")
    ablated = job.description(job.resolve(_job(compression=2, shuffle=True, invert=True)), "fp32", "abc123", m)
    assert "from the weights of abc123, pruned 2x by mag (global scope, 1 round, ablation: shuffle, invert)" in ablated


def test_same_seed_same_run(mlflow_store):
    a = load_masks(f"runs:/{run_job(_job(pruner='rand', post_epochs=1))}")
    b = load_masks(f"runs:/{run_job(_job(pruner='rand', post_epochs=1))}")
    c = load_masks(f"runs:/{run_job(_job(pruner='rand', post_epochs=1, seed=1))}")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_pretraining_is_a_run_of_its_own_then_fresh_training(mlflow_store):
    run_id = run_job(_job(pre_epochs=2, post_epochs=1, lr_drops="1"))
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    pre = client.get_run(run.data.tags["pretrain_run"])
    assert pre.info.status == "FINISHED" and pre.data.tags["prunetrack.kind"] == "pretrain"
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "train_loss")] == [1, 2]
    assert "weights.pt" in {a.path for a in client.list_artifacts(pre.info.run_id)}
    # The digest names the logged weights, bit for bit (a repeat with the same one holds the same weights).
    weights = tracking.load_weights(pre.info.run_id)
    assert pre.data.tags["weights_sha256"] == tracking.weights_digest(weights)
    weights["conv1.weight"][0, 0, 0, 0] += 1e-6
    assert tracking.weights_digest(weights) != pre.data.tags["weights_sha256"]
    assert pre.data.tags["mlflow.note.content"].startswith("Pre-training of resnet20 on synthetic (seed 0)")
    assert "2 epochs of at most 2; `weights.pt` holds epoch 2" in pre.data.tags["mlflow.note.content"]
    assert f"from the weights of pre-training run {pre.info.run_id}" in run.data.tags["mlflow.note.content"]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1]


def test_failure_ends_run_failed_with_reason(mlflow_store, tmp_path):
    with pytest.raises(FileNotFoundError):
        run_job(_job(dataset="cifar10", data_dir=str(tmp_path / "missing"), download=False))
    run = _only_run()
    assert run.info.status == "FAILED"
    assert "missing" in run.data.tags["error"] and "download=false" in run.data.tags["error"]
    assert "error.txt" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}


def test_bad_config_creates_no_run(mlflow_store):
    for bad, match in [({"model": "vgg17"}, "vgg16_bn"), ({"compression": 0.5}, "compression must be >= 1"),
                       ({"post_epochs": 0}, "post_epochs must be >= 1"), ({"batch_size": 0}, "batch_size"),
                       ({"optimizer": "adamw"}, "adam, sgd, momentum, rms"), ({"lr_drops": "a,b"}, "lr_drops")]:
        with pytest.raises(ValueError, match=match):
            run_job(_job(**bad))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.xdist_group(CROWD)
def test_job_against_a_real_mlflow_server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        run_id = run_job(_job(experiment="on-server"))
        run = mlflow.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["params_remaining"] > 0
        assert load_masks(f"runs:/{run_id}")
    finally:
        mlflow.set_tracking_uri(None)


def _mlflow_run_args(*params, entry="prune"):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    args = [sys.executable, "-m", "mlflow", "run", REPO, "--env-manager", "local", "-e", entry,
            "--experiment-name", "projects"]
    for p in params:
        args += ["-P", p]
    return args, env


def _mlflow_run(tmp_path, *params, entry="prune"):
    args, env = _mlflow_run_args(*params, entry=entry)
    return subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_mlflow_run_entry_point(mlflow_store, tmp_path):
    out = _mlflow_run(tmp_path, "pruner=mag", "model=resnet20", "dataset=synthetic", "compression=10",
                      "post_epochs=1", "train_subset=200", "test_subset=100", "iterations=0")
    assert out.returncode == 0, out.stderr[-3000:]
    run = _only_run()
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "prune"
    # Named as prunetrack names its runs, and the logged experiment is the one the run is in.
    assert run.info.run_name == "resnet20-mag-10x-s0"
    assert run.data.params["experiment"] == "projects"
    assert run.data.params["iterations_resolved"] == "1"  # resolved next to the one mlflow run logged


@pytest.mark.slow
@pytest.mark.parametrize("signal_to", ["terminal: SIGINT to the group", "SIGTERM to mlflow run"])
def test_mlflow_run_interrupted_stops_the_trainer_and_marks_the_run(mlflow_store, tmp_path, signal_to):
    """Ctrl-C in a terminal reaches `mlflow run` and the trainer; a scheduler's SIGTERM may
    reach `mlflow run` alone, which then exits at once. Either way the trainer stops and
    its run ends as interrupted: KILLED, or FAILED (MLflow overwrites KILLED after a
    Ctrl-C) with the `interrupted` tag."""
    import signal
    import time

    args, env = _mlflow_run_args("model=resnet20", "dataset=synthetic", "post_epochs=500", "train_subset=200",
                                 "test_subset=100")
    store.prepare_store()  # created here, before both processes open it
    log = open(tmp_path / "mlflow-run.log", "w")
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:  # until the trainer has logged an epoch
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow-run.log").read_text()[-3000:]
            runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
            if runs and mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "test_loss"):
                break
            time.sleep(1)
        trainer = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith("python entrypoints/")]
        if signal_to.startswith("terminal"):
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{p}") and _cmdline(p) for p in trainer):
            assert time.monotonic() < deadline, "the trainer is still running"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run = _only_run()
    assert tracking.outcome(run) == "KILLED"
    assert run.data.tags["interrupted"] == ("SIGINT" if signal_to.startswith("terminal") else "parent-died")


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_mlflow_run_bad_input_fails_the_run_with_the_reason(mlflow_store, tmp_path):
    out = _mlflow_run(tmp_path, "pruner=prune-everything", "dataset=synthetic")
    assert out.returncode != 0
    assert "prune-everything" in out.stderr and "'rand'" in out.stderr
    run = _only_run()
    assert run.info.status == "FAILED" and "prune-everything" in run.data.tags["error"]


@pytest.mark.slow
def test_job_on_the_shared_cifar10_copy(mlflow_store, cifar10_dir):
    """The real data path: the official layout written from the offline copy, read,
    checksummed, pruned with SNIP on real images, trained, logged."""
    run_id = run_job(JobConfig.from_flat({**SMOKE, "dataset": "cifar10", "data_dir": cifar10_dir,
                                          "download": False, "pruner": "snip", "compression": 5,
                                          "train_subset": 1000, "test_subset": 500}))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["train_examples"] == "1000" and run.data.tags["test_examples"] == "500"
    assert len(run.data.tags["dataset_sha256"]) == 64
    m = run.data.metrics
    assert m["params_remaining"] == round(m["params_prunable"] / 5)
    assert m["flops_effective"] < m["flops_dense"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prune_process(tmp_path, uri, *args, stderr=subprocess.STDOUT):
    """A tiny `prunetrack prune` in a process of its own, logging to `uri` (its output in
    .stdout, with its errors unless `stderr` says otherwise)."""
    env = {**os.environ, "PYTHONPATH": REPO, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PRUNETRACK_CHECKPOINT_DIR": str(tmp_path / "checkpoints")}
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(var, None)
    command = [sys.executable, "-m", "prunetrack", "prune", "--dataset", "synthetic", "--model", "resnet20",
               "--post-epochs", "1", "--train-subset", "100", "--test-subset", "50", "--batch-size", "50",
               "--test-batch-size", "50", "--device", "cpu", "--precision", "fp32", "--timing-repeats", "1", *args]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


@pytest.mark.slow
@pytest.mark.xdist_group(CROWD)
@pytest.mark.parametrize("store", ["new sqlite file", "server"])
def test_eight_jobs_started_at_once(store, tmp_path, request):
    """Eight jobs at once on a SQLite store that does not exist yet (they must not race
    its creation), or on a tracking server: every one finishes, in the experiment asked for."""
    if store == "server":
        uri = request.getfixturevalue("mlflow_server")
    else:
        (tmp_path / "new").mkdir()
        uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    experiment = f"crowd-{tmp_path.name}"
    procs = [_prune_process(tmp_path, uri, "--seed", str(seed), "--experiment", experiment) for seed in range(8)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)
    assert sorted(r.data.tags["seed"] for r in runs) == [str(s) for s in range(8)]
    assert all(r.info.status == "FINISHED" for r in runs)
    default = client.get_experiment_by_name("Default")
    assert default is None or client.search_runs([default.experiment_id]) == []


def test_half_initialized_sqlite_store_is_named_with_the_repair(tmp_path):
    """A store whose creation was interrupted (its schema half-migrated) gets one clear
    error naming the file and how to repair it."""
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db = tmp_path / "broken.db"
    SqlAlchemyStore(f"sqlite:///{db}", str(tmp_path / "artifacts")).engine.dispose()
    with sqlite3.connect(db) as c:  # back to the first migration, with one table missing: as if cut short
        c.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
        c.execute("DROP TABLE trace_info")
    with pytest.raises(store.TrackingError) as e:
        store.prepare_store(f"sqlite:///{db}")
    assert str(db) in str(e.value) and "already exists" in str(e.value)
    assert "mlflow db upgrade" in str(e.value) and "fresh file" in str(e.value)


def test_diverging_training_stops_the_run_at_that_epoch(mlflow_store):
    with pytest.raises(training.Diverged, match=r"train diverged at epoch (\d): the training loss is nan .*"
                                                r"lower the learning rate \(--lr\)") as e:
        run_job(_job(optimizer="sgd", lr=1e6, post_epochs=6, precision="fp32"))
    epoch = int(re.search(r"epoch (\d)", str(e.value)).group(1))
    run = _only_run()
    assert run.info.status == "FAILED" and run.data.tags["diverged"] == str(epoch)
    assert "Diverged" in run.data.tags["error"]
    client = mlflow.MlflowClient()
    # Every epoch up to the diverged one is kept; the job went no further.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")] == list(range(1, epoch))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, epoch + 1))
    assert "histograms.json" not in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.xdist_group(CROWD)  # timed: kept away from the crowds of processes
def test_unreachable_tracking_server_fails_in_one_line(tmp_path):
    # That the job asks only once (no retries with back-off) is asserted in test_tracking;
    # here, the user's view: exit status 1 and one line naming the problem.
    proc = _prune_process(tmp_path, f"http://127.0.0.1:{_free_port()}", stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert "does not answer" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
