"""A whole job, end to end, against real MLflow stores."""
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from prunetrack import load_masks, masking, models
from prunetrack.config import JobConfig
from prunetrack.job import run_job
from tests.conftest import REPO, SMOKE


def _job(**overrides):
    return JobConfig.from_flat({**SMOKE, "pruner": "mag", "compression": 10, "train_subset": 200,
                                "test_subset": 100, **overrides})


def _only_run():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    return runs[0]


def test_job_logs_the_whole_run(mlflow_store):
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
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "masks.pt", "layers.json"} <= artifacts

    # The logged masks load back and fit the model they came from.
    masks = load_masks(f"runs:/{run_id}")
    model = masking.add_masks(models.get_model("resnet20"))
    masking.set_masks(model, masks)
    assert masking.count(model) == (prunable, m["params_remaining"])


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


def _mlflow_run(tmp_path, *params, entry="prune"):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    args = [sys.executable, "-m", "mlflow", "run", REPO, "--env-manager", "local", "-e", entry,
            "--experiment-name", "projects"]
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_mlflow_run_entry_point(mlflow_store, tmp_path):
    out = _mlflow_run(tmp_path, "pruner=mag", "model=resnet20", "dataset=synthetic", "compression=10",
                      "post_epochs=1", "train_subset=200", "test_subset=100", "iterations=0")
    assert out.returncode == 0, out.stderr[-3000:]
    run = _only_run()
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "prune"
    assert run.data.params["iterations_resolved"] == "1"  # resolved next to the one mlflow run logged


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
