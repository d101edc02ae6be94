"""Resume inside a job, shared pre-training and the dense cell: what makes a long study
survive interruptions and not repeat work."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from prunetrack import checkpoint, job, load_masks, store, tracking
from prunetrack.config import JobConfig
from prunetrack.job import run_job
from tests.conftest import REPO, SMOKE, speed_record


def _job(**overrides) -> JobConfig:
    return JobConfig.from_flat({**SMOKE, "pruner": "mag", "compression": 10, "train_subset": 300,
                                "test_subset": 100, "batch_size": 64, "precision": "fp32", **overrides})


@pytest.fixture
def final_weights(monkeypatch):
    """The weights each job ends with, captured as it measures them."""
    captured = []
    original = job.measure_and_log

    def capture(s, *args, **kwargs):
        captured.append({k: v.detach().clone() for k, v in s.model.state_dict().items()})
        return original(s, *args, **kwargs)

    monkeypatch.setattr(job, "measure_and_log", capture)
    return captured


def _steps(run_id: str, key: str = "train_loss") -> list[int]:
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def test_interrupted_job_resumes_in_the_same_run_with_the_same_weights(mlflow_store, final_weights, monkeypatch,
                                                                       capsys):
    cfg = dict(post_epochs=4)
    straight = run_job(_job(**cfg))

    # Interrupted (Ctrl-C) right after epoch 2's checkpoint, before its metrics are logged.
    real_log = tracking.log_metrics

    def interrupt(metrics, step=None):
        if step == 2 and "train_loss" in metrics:
            raise KeyboardInterrupt
        real_log(metrics, step)

    monkeypatch.setattr(tracking, "log_metrics", interrupt)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run_job(_job(**cfg))
    monkeypatch.setattr(tracking, "log_metrics", real_log)
    # The user is told what the stop kept and how to go on.
    folder = os.path.join(checkpoint.root(), job.resolve(_job(**cfg)).config_hash())
    assert (f"train: stopped; the checkpoint in {folder} holds train epoch 2/4: running the same job again "
            f"resumes from there") in capsys.readouterr().err
    client = mlflow.MlflowClient()
    killed = [r for r in client.search_runs([r.info.experiment_id for r in [client.get_run(straight)]])
              if r.info.run_id != straight][0]
    assert killed.info.status == "KILLED" and _steps(killed.info.run_id) == [1]
    assert killed.data.tags["interrupted"] == "SIGINT" and "error" in killed.data.tags

    capsys.readouterr()
    resumed = run_job(_job(**cfg))
    assert resumed == killed.info.run_id  # the same MLflow run, FINISHED now
    assert "resuming from the checkpoint" in capsys.readouterr().out
    assert client.get_run(resumed).info.status == "FINISHED"
    assert _steps(resumed) == [1, 2, 3, 4] and _steps(resumed, "test_top1") == [1, 2, 3, 4]
    tags = client.get_run(resumed).data.tags
    assert tags["resumed_at_epoch"] == "2"
    # Finished: no error left on it; the interruption is history.
    assert "error" not in tags and "interrupted" not in tags
    assert tags["interruptions"] == "1" and tags["last_interruption"].startswith("SIGINT: KeyboardInterrupt")
    # fp32 on the CPU: bit for bit what the uninterrupted job computed.
    a, b = final_weights[0], final_weights[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = {r: [m.value for m in sorted(client.get_metric_history(r, "train_loss"), key=lambda m: m.step)]
              for r in (straight, resumed)}
    assert losses[straight] == losses[resumed]
    # A FINISHED run keeps no checkpoint.
    assert not os.path.exists(os.path.join(checkpoint.root(), job.resolve(_job(**cfg)).config_hash()))


class _Clock:
    """time.time() for prunetrack.interrupts, moved forward at will."""

    def __init__(self):
        self.ahead = 0.0

    def time(self):
        return time.time() + self.ahead

    def sleep(self, seconds):
        time.sleep(seconds)


def test_a_job_stops_before_an_epoch_that_would_end_after_its_time_limit(mlflow_store, monkeypatch):
    """`prunetrack prune --time-limit`: after epoch 1, less time is left than an epoch
    takes, so epoch 2 is not started: the run ends KILLED at epoch 1's checkpoint, the
    command exits 75 and says why; run again (here without a limit) it resumes."""
    from click.testing import CliRunner

    from prunetrack import cli, interrupts

    clock = _Clock()
    monkeypatch.setattr(interrupts, "time", clock)
    real_log = tracking.log_metrics

    def late(metrics, step=None):  # once epoch 1 is saved, jump to half an epoch before the limit
        real_log(metrics, step)
        if step == 1 and "epoch_time" in metrics:
            clock.ahead = interrupts.deadline() - time.time() - metrics["epoch_time"] / 2

    monkeypatch.setattr(tracking, "log_metrics", late)
    args = ["prune", "--dataset", "synthetic", "--model", "resnet20", "--pruner", "mag", "--compression", "10",
            "--train-subset", "300", "--test-subset", "100", "--batch-size", "64", "--test-batch-size", "128",
            "--precision", "fp32", "--device", "cpu", "--post-epochs", "3"]
    result = CliRunner().invoke(cli.cli, args + ["--time-limit", "1h"])
    assert result.exit_code == interrupts.EXIT_TIME_UP, result.output
    folder = os.path.join(checkpoint.root(), job.resolve(_job(post_epochs=3)).config_hash())
    assert ("train: stopped (time limit: train epoch 2/3 would not end before it; an epoch takes ~"
            in result.output)
    assert f"the checkpoint in {folder} holds train epoch 1/3: running the same job again resumes" in result.output
    client = mlflow.MlflowClient()
    [stopped] = client.search_runs([store.experiment_id("prunetrack")])
    assert stopped.info.status == "KILLED" and stopped.data.tags["interrupted"] == "time-limit"
    assert _steps(stopped.info.run_id) == [1]
    assert interrupts.deadline() is None  # the limit was the command's, not the process's
    # Its epoch timed this machine: estimates may use it, though the run did not finish.
    [record] = tracking.speed_records("prunetrack")
    assert record["status"] == "KILLED" and len(record["epoch_times"]) == len(record["eval_times"]) == 1

    monkeypatch.setattr(tracking, "log_metrics", real_log)
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 0, result.output
    run = client.get_run(stopped.info.run_id)
    assert run.info.status == "FINISHED" and _steps(run.info.run_id) == [1, 2, 3]
    assert run.data.tags["last_interruption"].startswith("time-limit: TimeUp: time limit: train epoch 2/3")


def test_a_new_run_under_a_time_limit_expects_its_first_epoch_to_take_what_earlier_runs_took(mlflow_store,
                                                                                             monkeypatch):
    """Before a run has an epoch of its own, the experiment's finished runs of the same
    training on this kind of device say how long one takes: a limit shorter than that stops
    the run before its first epoch (after its pruning, kept), rather than one epoch late."""
    from click.testing import CliRunner

    from prunetrack import cli, interrupts

    earlier = speed_record(_job(test_batch_size=128), [600.0])  # the training the command line below asks for
    monkeypatch.setattr(tracking, "speed_records", lambda experiment: [earlier])
    args = ["prune", "--dataset", "synthetic", "--model", "resnet20", "--pruner", "mag", "--compression", "10",
            "--train-subset", "300", "--test-subset", "100", "--batch-size", "64", "--test-batch-size", "128",
            "--precision", "fp32", "--device", "cpu", "--post-epochs", "3"]
    result = CliRunner().invoke(cli.cli, args + ["--time-limit", "5m"])
    assert result.exit_code == interrupts.EXIT_TIME_UP, result.output
    # 600 s of training and 1 s of testing an epoch, by the earlier run
    assert "train: stopped (time limit: train epoch 1/3 would not end before it; an epoch takes ~0:10:01" \
        in result.output, result.output
    assert "holds train epoch 0/3 (before any training)" in result.output
    [stopped] = mlflow.MlflowClient().search_runs([store.experiment_id("prunetrack")])
    assert stopped.info.status == "KILLED" and stopped.data.tags["interrupted"] == "time-limit"


def test_time_limit_must_be_a_positive_duration():
    from click.testing import CliRunner

    from prunetrack import cli

    for bad, said in (("90", "is not a duration"), ("2 hours", "is not a duration"), ("0m", "is no time at all")):
        result = CliRunner().invoke(cli.cli, ["sweep", os.path.join(REPO, "sweeps", "smoke.yaml"), "--time-limit", bad])
        assert result.exit_code == 2 and said in result.output and "2h30m" in result.output, result.output
    assert cli.Duration().convert("2h30m", None, None) == 9000.0
    assert cli.Duration().convert("1.5h", None, None) == 5400.0 and cli.Duration().convert("45s", None, None) == 45.0
    assert cli.Duration().convert("", None, None) is None  # MLproject's default: no limit


def _interrupted_after_epoch_1(cfg: JobConfig, monkeypatch) -> None:
    """Run `cfg` until its first epoch is checkpointed and logged, then Ctrl-C."""
    real_fit = job.training.fit

    def one_epoch_then_interrupt(*args, **kwargs):
        on_epoch = args[6]

        def stop(epoch, metrics):
            on_epoch(epoch, metrics)
            raise KeyboardInterrupt
        return real_fit(*args[:6], stop, **kwargs)

    monkeypatch.setattr(job.training, "fit", one_epoch_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg)
    monkeypatch.setattr(job.training, "fit", real_fit)


def test_resume_false_starts_over(mlflow_store, monkeypatch):
    _interrupted_after_epoch_1(_job(post_epochs=2), monkeypatch)
    first = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    again = run_job(_job(post_epochs=2, resume=False))
    assert again != first.info.run_id and _steps(again) == [1, 2]
    assert mlflow.MlflowClient().get_run(first.info.run_id).info.status == "KILLED"


def test_a_checkpoint_begun_in_another_precision_is_not_continued(mlflow_store, monkeypatch):
    """`precision auto` resolves per machine: a checkpoint moved to a machine where it resolves
    otherwise is refused, before any run is reopened, rather than finished in a second precision."""
    _interrupted_after_epoch_1(_job(post_epochs=2, precision="auto"), monkeypatch)
    cfg = job.resolve(_job(post_epochs=2, precision="auto"))
    here = job.training.resolve_precision("auto", torch.device("cpu"))
    other = "fp32" if here == "bf16" else "bf16"
    with checkpoint.Checkpoint("", cfg.config_hash()) as ckpt:
        state = ckpt.load()
        assert state["precision"] == here and state["epoch"] == 1
        ckpt.save({**state, "precision": other})  # as if begun on a machine where auto resolved otherwise

    with pytest.raises(checkpoint.NotResumable) as e:
        run_job(_job(post_epochs=2, precision="auto"))
    assert (f"holds train epoch 1/2 trained in {other}, but here precision 'auto' resolves to {here} (bf16 is "
            "native only on CUDA GPUs since Ampere and on CPUs with AMX or AVX512-BF16)") in str(e.value)
    assert "or start it over in" in str(e.value) and "--resume false" in str(e.value)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED" and run.data.tags["precision"] == here  # left as it was


def test_a_checkpoint_begun_on_another_kind_of_device_is_not_continued(mlflow_store, monkeypatch):
    """A GPU's data stream cannot take up a CPU's (nor the reverse): such a checkpoint is
    refused before any run is reopened; one of an earlier version, which names no device
    (all were made on CPUs), resumes on a CPU."""
    _interrupted_after_epoch_1(_job(post_epochs=2), monkeypatch)
    cfg = job.resolve(_job(post_epochs=2))
    with checkpoint.Checkpoint("", cfg.config_hash()) as ckpt:
        state = ckpt.load()
        assert state["device"] == "cpu"
        ckpt.save({**state, "device": "cuda"})  # as if begun on a GPU, its folder shared with this machine

    with pytest.raises(checkpoint.NotResumable) as e:
        run_job(_job(post_epochs=2))
    assert "holds train epoch 1/2 trained on cuda, but this job runs on cpu" in str(e.value)
    assert "--device cuda" in str(e.value) and "--resume false" in str(e.value)
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED"

    with checkpoint.Checkpoint("", cfg.config_hash()) as ckpt:
        ckpt.save({k: v for k, v in ckpt.load().items() if k != "device"})
    run_job(_job(post_epochs=2))
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and sorted(tracking.logged_steps(run.info.run_id, "test_loss")) == [1, 2]


def test_a_configuration_runs_in_one_process_at_a_time(mlflow_store):
    cfg = job.resolve(_job())
    with checkpoint.Checkpoint("", cfg.config_hash()):
        with pytest.raises(checkpoint.CheckpointBusy, match="another process"):
            run_job(_job())
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_kill_9_mid_epoch_loses_at_most_that_epoch(mlflow_store, tmp_path):
    """A job SIGKILLed during an epoch, run again, continues from its last finished epoch in
    the same MLflow run (the sweep and `mlflow run` start jobs the same way)."""
    args = [sys.executable, "-m", "prunetrack", "prune", "--dataset", "synthetic", "--model", "resnet20",
            "--pruner", "rand", "--compression", "5", "--batch-size", "32", "--post-epochs", "4",
            "--precision", "fp32", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": REPO}
    cfg = job.resolve(JobConfig.from_flat(dict(dataset="synthetic", model="resnet20", pruner="rand", compression=5,
                                               batch_size=32, post_epochs=4, precision="fp32", device="cpu")))
    progress = os.path.join(checkpoint.root(), cfg.config_hash(), checkpoint.PROGRESS)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if os.path.exists(progress):
                with open(progress) as f:
                    if json.load(f)["epoch"] >= 2:
                        break
            time.sleep(0.05)
        else:
            pytest.fail("the job did not finish two epochs in time")
        time.sleep(0.3)  # into the next epoch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with open(progress) as f:
        done = json.load(f)["epoch"]
    assert 2 <= done < 4
    run_id = mlflow.search_runs(search_all_experiments=True, output_format="list")[0].info.run_id
    assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"  # nobody could close it

    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"epoch {done}/4 finished; continuing in the same run" in out.stdout
    assert f"run {run_id}:" in out.stdout
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    assert _steps(run_id) == [1, 2, 3, 4]


def test_magnitude_cells_share_one_pretraining(mlflow_store, capsys):
    runs = [run_job(_job(compression=c, pre_epochs=2, post_epochs=1)) for c in (2, 5)]
    client = mlflow.MlflowClient()
    exp = client.get_run(runs[0]).info.experiment_id
    pre = client.search_runs([exp], "tags.`prunetrack.kind` = 'pretrain'")
    assert len(pre) == 1
    assert {client.get_run(r).data.tags["pretrain_run"] for r in runs} == {pre[0].info.run_id}
    assert "starting from run" in capsys.readouterr().out

    # Any trained weights can be pruned: the same ones, named by the user, give the same masks.
    own = run_job(_job(compression=5, init_from=f"runs:/{pre[0].info.run_id}", post_epochs=1))
    a, b = load_masks(f"runs:/{runs[1]}"), load_masks(f"runs:/{own}")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_stops_when_the_test_loss_stops_improving(mlflow_store, monkeypatch):
    losses = iter([2.0, 1.0, 1.5, 1.2, 1.1, 0.5])
    real = job.training.evaluate

    def evaluate(model, batches, precision="fp32", progress=None):  # a scripted test-loss curve
        return {**real(model, batches, precision), "loss": next(losses)}

    monkeypatch.setattr(job.training, "evaluate", evaluate)
    from prunetrack import pretrain

    cfg = job.resolve(_job(pre_epochs=6, pre_patience=2))
    run_id = pretrain.obtain(cfg, torch.device("cpu"))
    run = mlflow.MlflowClient().get_run(run_id)
    # Best at epoch 2; epochs 3 and 4 do not improve on it: stop after epoch 4.
    assert run.data.metrics["epochs_run"] == 4 and run.data.metrics["best_epoch"] == 2
    assert run.data.tags["stopped"] == "patience"
    assert ("4 epochs of at most 6, stopped once the test loss had not improved for 2 epochs; `weights.pt` holds "
            "epoch 2 (test loss 1.0000") in run.data.tags["mlflow.note.content"]


def test_dense_cell_is_one_configuration(mlflow_store):
    dense = [_job(pruner=p, compression=1) for p in ("rand", "snip", "grasp", "synflow")]
    assert len({job.resolve(c).config_hash() for c in dense}) == 1
    assert _job(pruner="rand", compression=1).config_hash() != _job(pruner="rand", compression=2).config_hash()
    run = mlflow.MlflowClient().get_run(run_job(_job(pruner="synflow", compression=1)))
    assert run.data.tags["dense"] == "true" and run.data.metrics["density"] == 1.0


def test_checkpoints_written_before_the_mask_rename_resume(tmp_path):
    """Checkpoints of earlier versions name the mask buffer `weight_mask`; loading one
    renames those keys (in the model and in the best epoch's copy), so the job resumes."""
    from prunetrack import masking, models

    model = masking.add_masks(models.get_model("resnet20"))
    masks = {n: torch.rand(m.shape) < 0.5 for n, m in masking.get_masks(model).items()}
    masking.set_masks(model, masks)
    current = model.state_dict()

    def old_style(weights):
        renamed = type(weights)((k.rsplit(".", 1)[0] + ".weight_mask" if masking.is_mask_key(k) else k, v)
                                for k, v in weights.items())
        if hasattr(weights, "_metadata"):
            renamed._metadata = weights._metadata
        return renamed

    old = old_style(current)
    assert sum(k.endswith(".weight_mask") for k in old) == len(masks)
    with checkpoint.Checkpoint(str(tmp_path), "key") as ckpt:
        ckpt.save({"run_id": "r", "phase": "train", "epoch": 1, "epochs": 2, "model": old,
                   "best": {"epoch": 1, "test_loss": 1.0, "model": old_style(dict(current))}})
        state = ckpt.load()
    for weights in (state["model"], state["best"]["model"]):
        assert list(weights) == list(current)  # renamed in place, order kept
        assert all(torch.equal(weights[k], v) for k, v in current.items())
    fresh = masking.add_masks(models.get_model("resnet20"))
    fresh.load_state_dict(state["model"])  # strict: every key fits
    assert all(torch.equal(masking.get_masks(fresh)[n], m) for n, m in masks.items())


def test_init_from_a_run_without_weights_is_refused_before_any_run(mlflow_store):
    with pytest.raises(store.TrackingError, match="cannot load weights from 'nosuchrun'"):
        run_job(_job(init_from="nosuchrun"))
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
