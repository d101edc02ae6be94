import os
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from prunetrack import config
from prunetrack.cli import cli
from tests.conftest import REPO


def test_mlproject_prune_exposes_every_parameter_with_its_default():
    with open(os.path.join(REPO, "MLproject")) as f:
        spec = yaml.safe_load(f)
    entry = spec["entry_points"]["prune"]
    fields = {f.name: f for f in config.fields() if f.metadata["mlproject"]}
    # and the job's time limit, which is no hyperparameter ("": none)
    assert set(entry["parameters"]) == set(fields) | {"time_limit"}
    assert entry["parameters"]["time_limit"]["default"] == "" and "--time-limit {time_limit}" in entry["command"]
    for name, f in fields.items():
        default = entry["parameters"][name]["default"]
        if isinstance(f.default, bool):
            assert str(default).lower() == str(f.default).lower(), name
        else:
            assert type(f.default)(default) == f.default, name
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"], name


def test_flat_round_trip_and_unknown_keys():
    cfg = config.JobConfig.from_flat({"model": "resnet50", "compression": 20.0, "seed": 3})
    assert cfg.model.model == "resnet50" and cfg.prune.compression == 20 and cfg.run.seed == 3
    assert config.JobConfig.from_flat(cfg.flat()) == cfg
    with pytest.raises(ValueError, match="unknown configuration keys: modle"):
        config.JobConfig.from_flat({"modle": "vgg16"})


def test_defaults_follow_the_study():
    cfg = config.JobConfig()
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size, cfg.train.weight_decay) == ("adam", 1e-3, 256, 0)
    assert cfg.train.test_batch_size == 256 and cfg.prune.prune_batch_size == 256
    assert cfg.prune.prune_per_class == 10 and cfg.prune.scope == "global" and cfg.train.lr_drops == ""


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_field_must_be_finite(value):
    floats = [f.name for f in config.fields() if f.type in ("float", float)]
    assert {"compression", "lr", "weight_decay", "lr_drop_rate"} <= set(floats)
    for name in floats:
        with pytest.raises(ValueError, match=rf"^{name} must be a finite number.*, got {value!r}$"):
            config.JobConfig.from_flat({name: value}).validate()


@pytest.mark.parametrize("args, message", [
    (["--model", "vgg17"], "'vgg16'"),
    (["--pruner", "l1"], "'rand'"),
    (["--dataset", "mnist"], "'cifar10'"),
    (["--optimizer", "adamw"], "'momentum'"),
    (["--compression", "0.5"], "compression must be >= 1"),
    (["--post-epochs", "0"], "post_epochs must be >= 1"),
    (["--pre-epochs", "-1"], "pre_epochs must be >= 0"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--test-batch-size", "-5"], "test_batch_size must be >= 1"),
    (["--lr-drops", "ten"], "lr_drops must be comma-separated"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--lr", "nan"], "lr must be a finite number >= 0, got nan"),
    (["--compression", "inf"], "compression must be a finite number >= 1, got inf"),
])
def test_cli_refuses_bad_input_clearly(args, message, mlflow_store):
    result = CliRunner().invoke(cli, ["prune", "--dataset", "synthetic", *args])
    assert result.exit_code != 0
    assert message in (result.output + str(result.exception)), result.output


def test_registries_hold_the_names_config_lists():
    """The command line offers config's name lists without importing the registries; the
    registries (which import torch) must hold exactly those names, in that order."""
    from prunetrack import data, models, pruning, training

    registries = {"datasets": data.DATASETS, "models": models.MODELS, "pruners": pruning.PRUNERS,
                  "scopes": pruning.SCOPES, "schedules": pruning.SCHEDULES, "prune_modes": pruning.PRUNE_MODES,
                  "optimizers": training.OPTIMIZERS,
                  "precisions": training.PRECISIONS}
    assert set(registries) == set(config.REGISTRIES)
    for name, registry in registries.items():
        assert tuple(registry) == config.REGISTRIES[name] == tuple(config.choices(name)), name
    with pytest.raises(RuntimeError, match="pruners registry holds .*'obd'.*config.PRUNERS"):
        config.check_registry("pruners", [*pruning.PRUNERS, "obd"])


@pytest.mark.parametrize("code", [
    "import prunetrack.cli",
    # Building every command and its options, as --help does.
    "from prunetrack.cli import cli; cli.main(['prune', '--help'], standalone_mode=False)",
])
def test_the_command_line_imports_nothing_heavy(code):
    """`prunetrack --help` must not wait for torch, mlflow or matplotlib: the commands
    import them when they run."""
    check = f"{code}; import sys; print([m for m in ('torch', 'mlflow', 'matplotlib', 'numpy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_config_hash_counts_the_rounds_actually_run():
    """iterations=0 means the pruner's default: the hash is the same whether or not the
    default was filled in first, and computing it changes nothing."""
    unresolved = config.JobConfig.from_flat({"pruner": "synflow", "iterations": 0})
    before = unresolved.config_hash()
    assert unresolved.prune.iterations == 0
    resolved = config.resolve(config.JobConfig.from_flat({"pruner": "synflow", "iterations": 0}))
    assert resolved.prune.iterations == config.default_iterations("synflow") == 100
    assert resolved.config_hash() == before
    assert config.JobConfig.from_flat({"pruner": "synflow", "iterations": 100}).config_hash() == before
    assert config.JobConfig.from_flat({"pruner": "synflow", "iterations": 10}).config_hash() != before
    assert config.JobConfig.from_flat({"pruner": "mag"}).config_hash() == \
        config.JobConfig.from_flat({"pruner": "mag", "iterations": 1}).config_hash()


def test_run_name():
    cfg = config.JobConfig.from_flat({"model": "vgg16", "pruner": "snip", "compression": 2.5, "seed": 3})
    assert config.run_name(cfg) == config.default_run_name(cfg) == "vgg16-snip-2.5x-s3"
    cfg.run.run_name = "mine"
    assert config.run_name(cfg) == "mine" and config.default_run_name(cfg) == "vgg16-snip-2.5x-s3"


def test_prune_validates_the_configuration_once(mlflow_store, monkeypatch):
    from prunetrack import job

    calls = []
    validate = config.JobConfig.validate
    monkeypatch.setattr(config.JobConfig, "validate", lambda self: calls.append(1) or validate(self))

    class Stop(Exception):
        pass

    def stop():  # the first step after the preparation: nothing more needs to run
        raise Stop

    monkeypatch.setattr(job.store, "prepare_store", stop)
    result = CliRunner().invoke(cli, ["prune", "--dataset", "synthetic", "--device", "cpu"])
    assert isinstance(result.exception, Stop), result.output
    assert len(calls) == 1


def test_a_field_added_later_keeps_earlier_hashes_at_its_old_behaviour():
    """prune_mode came after runs existed: at "eval" (what the code did before) it is left
    out of config_hash, so a study in progress keeps its finished cells and checkpoints."""
    cfg = config.JobConfig.from_flat({"pruner": "snip", "compression": 10})
    flat = cfg.flat()
    del flat["prune_mode"]
    flat["iterations"] = config.resolved_iterations(cfg)
    before = config._digest(flat, skip=config.NAMING_FIELDS)
    assert cfg.config_hash() == before
    train = config.JobConfig.from_flat({"pruner": "snip", "compression": 10, "prune_mode": "train"})
    assert train.config_hash() != before
    assert config.value_before("prune_mode") == "eval" and config.value_before("lr") is None
