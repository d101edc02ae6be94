import os

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
    assert set(entry["parameters"]) == set(fields)
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
