"""The training path: accuracy arithmetic, schedules, precision and the compile path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetrack import masking, models, training


class Fixed(nn.Module):
    """Returns preset logits, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits[x.long().view(-1)] + self.w


def test_top1_top5_and_loss_arithmetic():
    logits = torch.tensor([[9., 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    y = torch.tensor([0, 0, 5])  # hit at rank 1; rank 6 (miss in top-5); rank 6 (miss)
    batches = [(torch.tensor([0.0, 1.0]), y[:2]), (torch.tensor([2.0]), y[2:])]
    out = training.evaluate(Fixed(logits), batches)
    assert out["top1"] == pytest.approx(100 / 3) and out["top5"] == pytest.approx(100 / 3)
    expected = torch.nn.functional.cross_entropy(logits, y).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-6)


def test_lr_drops_take_effect_at_their_epochs():
    model = nn.Linear(2, 2)
    opt, sched = training.make_optimizer("sgd", model, 0.1, 0.0, [2, 4], 0.5)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # an epoch's steps, then the scheduler: the order PyTorch expects
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert training.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert training.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert training.resolve_precision("auto", cpu) == "fp32"
    assert training.resolve_precision("bf16", cpu) == "bf16" and training.resolve_precision("fp32", cpu) == "fp32"
    # A GPU (none is needed: its compute capability is what decides): Ampere and later have
    # native bf16, a Volta emulates it.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert training.resolve_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert training.resolve_precision("auto", torch.device("cuda")) == "fp32"


def test_pruning_scores_in_exact_fp32_and_the_settings_come_back(monkeypatch):
    """cuDNN convolutions default to TF32 on Ampere and later: scores are computed with it
    off, from deterministic algorithms, and the job's own settings are restored afterwards."""
    from prunetrack import pruning

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    seen = []

    def scorer(model, batches, generator):
        seen.append((cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic))
        return {n: torch.rand(m.weight.shape, generator=generator)
                for n, m in masking.prunable_layers(model).items()}

    monkeypatch.setitem(pruning.PRUNERS, "rand", scorer)
    before = cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic
    try:
        # TF32 as torch has it; autotuning as a CUDA job sets it for training.
        cudnn.allow_tf32 = matmul.allow_tf32 = cudnn.benchmark = True
        cudnn.deterministic = False
        pruning.prune(models.get_model("resnet20"), "rand", 10)
        assert seen == [(False, False, False, True)]
        assert (cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic) == (True, True, True, False)
        with cudnn.flags(enabled=True):  # torch's own use of the flags still works
            pass
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.benchmark, cudnn.deterministic = before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_keeps_pruned_weights_zero(precision):
    torch.manual_seed(0)
    model = masking.add_masks(models.get_model("resnet20"))
    masks = {k: torch.rand_like(m, dtype=torch.float) < 0.5 for k, m in masking.get_masks(model).items()}
    masking.set_masks(model, masks)
    model = training.prepare(model)
    opt, _ = training.make_optimizer("adam", model, 1e-2, 0.0, [], 0.1)
    x, y = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (8,))
    loss = training.train_step(model, x, y, opt, precision, torch.device("cpu"))
    assert torch.isfinite(loss)
    for name, m in masking.prunable_layers(model).items():
        assert torch.count_nonzero(m.weight[~masks[name]]) == 0, name


def test_compiled_model_trains_like_the_eager_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    compiled = torch.compile(model)
    x, y = torch.randn(16, 3, 2, 2), torch.randint(0, 4, (16,))
    eager_loss = torch.nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(torch.nn.functional.cross_entropy(compiled(x), y), eager_loss, atol=1e-5)


def test_an_epoch_line_bounds_the_time_left_of_a_phase_that_may_stop_early(capsys):
    """With a patience stop, the phase ends at the latest at its epoch cap and at the earliest
    when the patience runs out: the line gives both, not only the cap (200 epochs: a day)."""
    torch.manual_seed(0)
    model = masking.add_masks(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))
    opt, sched = training.make_optimizer("adam", model, 1e-3, 0.0, [], 0.1)
    batches = [(torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,)))]
    last = training.fit(model, batches, batches, 200, opt, sched, lambda epoch, metrics: epoch == 3,
                        stop_by=lambda: 6)
    lines = capsys.readouterr().out.splitlines()
    assert last == 3 and len(lines) == 3
    assert lines[0].startswith("train epoch 1/200: ")
    assert "left in train if the test loss does not improve again (the patience stops it after epoch 6), at most ~" \
        in lines[0]
    assert lines[2].endswith("; stopping early)")
    training.fit(model, batches, batches, 5, opt, sched, lambda epoch, metrics: False, stop_by=lambda: 9, start_epoch=4)
    assert capsys.readouterr().out.strip().endswith("left in train)")  # the cap comes first: one bound


def test_the_time_left_follows_the_pace_of_the_last_epochs(monkeypatch, capsys):
    """An epoch slowed by other work on the machine (tests beside a sweep) is not averaged
    into the rest of the phase: the estimate follows the last epochs."""
    now, took = [0.0], {1: 100, 2: 900, 3: 100, 4: 100, 5: 500, 6: 500}
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])

    def on_epoch(epoch, metrics):
        now[0] += took.get(epoch, 500)

    model = masking.add_masks(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))
    opt, sched = training.make_optimizer("adam", model, 1e-3, 0.0, [], 0.1)
    batches = [(torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,)))]
    training.fit(model, batches, batches, 10, opt, sched, on_epoch)
    left = [line.split("; ~")[1].split(" left")[0] for line in capsys.readouterr().out.splitlines()]
    # 9 epochs at 100 s; after the slow epoch, the median of two is their mean; then 100 s again
    # (the slow epoch is the outlier of three), where the mean since the start would say 366 s an
    # epoch; after two slow epochs of three, their pace.
    assert left[:6] == ["0:15:00", "1:06:40", "0:11:40", "0:10:00", "0:08:20", "0:33:20"]


def test_an_epoch_is_started_only_if_it_ends_before_the_time_limit(monkeypatch):
    """After epoch 1 a second is left: enough for an epoch of this small network, but not for
    the last epoch when the measurements after it take long (a million passes over the test set)."""
    import time
    import types

    from prunetrack import interrupts

    ahead = [0.0]
    monkeypatch.setattr(interrupts, "time", types.SimpleNamespace(time=lambda: time.time() + ahead[0],
                                                                  sleep=time.sleep))

    def one_second_left(epoch, metrics):
        ahead[0] = interrupts.deadline() - time.time() - 1.0

    model = masking.add_masks(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))
    opt, sched = training.make_optimizer("adam", model, 1e-3, 0.0, [], 0.1)
    batches = [(torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,)))]
    with interrupts.time_limited(3600):
        assert training.fit(model, batches, batches, 2, opt, sched, one_second_left) == 2
    ahead[0] = 0.0
    with interrupts.time_limited(3600), pytest.raises(interrupts.TimeUp) as stop:
        training.fit(model, batches, batches, 2, opt, sched, one_second_left, final_evals=10**6)
    assert str(stop.value).startswith("time limit: train epoch 2/2 would not end before it; an epoch takes ~0:00:00, "
                                      "the measurements after the last ~")
    assert str(stop.value).endswith(", 0:00:01 was left")
    assert interrupts.deadline() is None  # the limit ends with its block
    # The job's estimate (the median of its saved epochs) comes first: a 2-hour epoch is not begun in 1 hour.
    with interrupts.time_limited(3600), pytest.raises(interrupts.TimeUp, match=r"train epoch 1/2 would not end "
                                                                                r"before it; an epoch takes ~2:00:00, (0:59:59|1:00:00) was left"):
        training.fit(model, batches, batches, 2, opt, sched, lambda epoch, metrics: None, epoch_estimate=lambda: 7200.0)
    # Without a limit nothing is checked.
    ahead[0] = 1e9
    assert training.fit(model, batches, batches, 2, opt, sched, lambda epoch, metrics: None, final_evals=10**6) == 2


def test_device_name_tells_cpus_of_one_architecture_apart(monkeypatch):
    from prunetrack.job import device_name

    cpu, threads, isa = torch.device("cpu"), torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(training, "cpu_info", lambda: {"model name": "Some CPU 7000", "flags": "avx2 avx512_bf16"})
    assert device_name(cpu) == f"cpu (Some CPU 7000, {isa}, native bf16 (AVX512-BF16), {threads} threads)"
    # AMX computes bf16 otherwise than AVX512-BF16: the tag that tells runs apart says which
    monkeypatch.setattr(training, "cpu_info", lambda: {"model name": "Some CPU 7000", "flags": "avx512_bf16 amx_bf16"})
    assert device_name(cpu) == f"cpu (Some CPU 7000, {isa}, native bf16 (AMX), {threads} threads)"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # oneDNN told to leave AMX alone
    assert device_name(cpu) == (f"cpu (Some CPU 7000, {isa}, native bf16 (AMX), ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16, "
                                f"{threads} threads)")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(training, "cpu_info", lambda: {"model name": "Some CPU 7000", "flags": "avx2"})
    assert device_name(cpu) == f"cpu (Some CPU 7000, {isa}, {threads} threads)"
    assert not training.native_bf16(cpu) and training.resolve_precision("auto", cpu) == "fp32"


def test_a_gpu_index_beyond_the_visible_ones_is_refused_with_the_ones_there(monkeypatch):
    """Before any run exists (job.prepare), not as a failed run: a sweep pins each cell to
    one GPU, which the cell sees as cuda:0."""
    from prunetrack.job import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError) as e:
        resolve_device("cuda:1")
    assert str(e.value) == ("device 'cuda:1' requested but only 1 CUDA device is visible (CUDA_VISIBLE_DEVICES=3); "
                            "use cuda:0, cuda or auto")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ValueError, match=r"only 4 CUDA devices are visible; use cuda:0 to cuda:3, cuda or auto"):
        resolve_device("cuda:4")
