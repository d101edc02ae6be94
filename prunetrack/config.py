"""Hyperparameters: one dataclass per group, and the job that holds them all.

Each field carries its help text (and, for named choices, the registry it must be a
key of). The Click options in `prunetrack.cli` and the MLflow params are generated
from these fields, so a new hyperparameter is added here and nowhere else (plus its
line in MLproject, which a test keeps in step).

This module imports nothing heavy (no torch, mlflow or numpy): the command line builds
its options from it, and `prunetrack --help` should answer at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

# The names each registry of named choices accepts, in the registry's order (error
# messages and --help list them in this order). The registries themselves live beside
# the code they name (data.DATASETS, models.MODELS, pruning.PRUNERS, training.OPTIMIZERS)
# and import torch; the names are kept here so that building the command line does not.
# Each registry module calls `check_registry` on import, so the two cannot drift apart.
DATASETS = ("cifar10", "cifar100", "synthetic")
MODELS = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
          "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet50")
PRUNERS = ("rand", "mag", "snip", "grasp", "synflow")
SCOPES = ("global", "local")
SCHEDULES = ("exponential", "linear")
PRUNE_MODES = ("eval", "train")
OPTIMIZERS = ("adam", "sgd", "momentum", "rms")
PRECISIONS = ("auto", "fp32", "bf16")
TIMING_PRECISIONS = ("trained", *PRECISIONS)  # `prunetrack time --precision`: trained = each run's own

REGISTRIES = {"datasets": DATASETS, "models": MODELS, "pruners": PRUNERS, "scopes": SCOPES,
              "schedules": SCHEDULES, "prune_modes": PRUNE_MODES, "optimizers": OPTIMIZERS,
              "precisions": PRECISIONS}

# Rounds of score-then-mask when `iterations` is 0: SynFlow iterates (100 rounds, as in
# its paper), every other pruner scores once.
DEFAULT_ITERATIONS = {"synflow": 100}


_NO_VALUE = object()


def _f(default, help: str, choices: str | None = None, minimum: float | None = None, mlproject: bool = True,
       hash_omits=_NO_VALUE):
    """A field with its help text, the registry that lists its valid values (by name,
    resolved lazily to avoid import cycles), its smallest allowed value, and whether
    MLproject exposes it as a parameter.

    `hash_omits`: for a field added after runs existed, the value that does what the code
    did before the field existed; config_hash leaves the field out at that value, so the
    runs (and checkpoints) of a study in progress keep their configuration hashes."""
    return field(default=default, metadata={"help": help, "choices": choices, "min": minimum,
                                            "mlproject": mlproject, "hash_omits": hash_omits})


@dataclass
class DataConfig:
    dataset: str = _f("cifar10", "Dataset.", choices="datasets")
    data_dir: str = _f("data", "Directory holding the dataset (cifar-10-batches-py/ or cifar-100-python/).")
    download: bool = _f(True, "Download the dataset (checksum verified) when it is absent.")
    train_subset: int = _f(0, "Use only this many training examples (0: all).", minimum=0)
    test_subset: int = _f(0, "Use only this many test examples (0: all).", minimum=0)


@dataclass
class ModelConfig:
    # vgg16_bn, not vgg16: pruned at initialization, the plain VGG16 barely passes signal.
    model: str = _f("vgg16_bn", "Model architecture.", choices="models")
    init_from: str = _f("", "Start from trained weights instead of a fresh initialization: a run id or "
                            "runs:/<run_id> URI of a run that logged weights.pt (a pre-training run), or a "
                            "path to such a file. Excludes pre_epochs.")


@dataclass
class PruneConfig:
    pruner: str = _f("rand", "Pruning method.", choices="pruners")
    compression: float = _f(10.0, "Compression ratio: prunable weights before / after (1 keeps all).",
                            minimum=1.0)
    scope: str = _f("global", "Rank scores across all layers (global) or within each layer (local).",
                    choices="scopes")
    iterations: int = _f(0, f"Prune-score rounds (0: the pruner's default, "
                            f"{DEFAULT_ITERATIONS['synflow']} for synflow, 1 otherwise).",
                         minimum=0)
    schedule: str = _f("exponential", "How density falls over the rounds.", choices="schedules")
    prune_mode: str = _f("eval", "Mode the network is scored in: eval (BatchNorm running statistics, as the "
                                 "Synaptic-Flow code scores) or train (batch statistics, as the original SNIP "
                                 "and GraSP code scores).", choices="prune_modes", hash_omits="eval")
    prune_per_class: int = _f(10, "Pruning data: examples per class.", minimum=1)
    prune_batch_size: int = _f(256, "Batch size while scoring.", minimum=1)
    shuffle: bool = _f(False, "Ablation: shuffle each layer's mask after pruning.")
    reinit: bool = _f(False, "Ablation: re-initialize the weights after pruning.")
    invert: bool = _f(False, "Ablation: invert the scores (keep the lowest).")


@dataclass
class TrainConfig:
    optimizer: str = _f("adam", "Optimizer.", choices="optimizers")
    lr: float = _f(1e-3, "Learning rate.", minimum=0.0)
    weight_decay: float = _f(0.0, "Weight decay.", minimum=0.0)
    lr_drops: str = _f("", "Comma-separated epochs at which the lr is multiplied by lr_drop_rate.")
    lr_drop_rate: float = _f(0.1, "Factor applied at each lr drop.", minimum=0.0)
    batch_size: int = _f(256, "Training batch size.", minimum=1)
    test_batch_size: int = _f(256, "Evaluation batch size.", minimum=1)
    pre_epochs: int = _f(0, "Epochs of training before pruning, done once in a run of its own (kind "
                            "pretrain) that every job with the same model, data, seed and pre-training "
                            "settings starts from.", minimum=0)
    pre_patience: int = _f(0, "Stop pre-training once the test loss has not improved for this many epochs, "
                              "and prune the best epoch's weights (0: train all pre_epochs).", minimum=0)
    post_epochs: int = _f(10, "Epochs of training after pruning.", minimum=1)
    precision: str = _f("auto", "Arithmetic for training and evaluation: auto (bf16 autocast on CUDA and on "
                        "CPUs with native bf16, AMX or AVX512-BF16; fp32 elsewhere), fp32, or bf16. Pruning scores are always computed in fp32 or better.",
                        choices="precisions")
    compile: bool = _f(False, "Compile the model with torch.compile for training and evaluation.")

    def lr_drop_epochs(self) -> list[int]:
        try:
            epochs = sorted(int(e) for e in self.lr_drops.replace(" ", "").split(",") if e)
        except ValueError:
            raise ValueError(f"lr_drops must be comma-separated epoch numbers such as '80,120', "
                             f"got {self.lr_drops!r}") from None
        if any(e < 1 for e in epochs):
            raise ValueError(f"lr_drops epochs must be >= 1, got {self.lr_drops!r}")
        return epochs


@dataclass
class RunConfig:
    seed: int = _f(0, "Seed for weights, data order, augmentation and pruning.")
    device: str = _f("auto", "Device: auto (cuda when present), cpu, cuda or cuda:N.")
    timing_repeats: int = _f(3, "Timed evaluations of the whole test set after one warm-up; test_time is "
                                "their median.", minimum=1)
    experiment: str = _f("prunetrack", "MLflow experiment (ignored under `mlflow run`, which sets its own).",
                         mlproject=False)
    run_name: str = _f("", "MLflow run name (default: model-pruner-compression).", mlproject=False)
    resume: bool = _f(True, "Continue an interrupted run of the same configuration from its last finished "
                            "epoch (false: start over).")
    checkpoint_dir: str = _f("", "Where per-epoch checkpoints are kept (default: $PRUNETRACK_CHECKPOINT_DIR, "
                                 "else ~/.cache/prunetrack/checkpoints).")


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "JobConfig":
        """Build from a flat {field: value} dict (Click options, MLflow params)."""
        groups = {}
        for name, group in GROUPS.items():
            names = {f.name for f in dataclasses.fields(group)}
            groups[name] = group(**{k: v for k, v in values.items() if k in names})
        unknown = set(values) - {f.name for f in fields()}
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        return cls(**groups)

    def flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in GROUPS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def validate(self) -> "JobConfig":
        """Raise ValueError naming the bad field, its value and what is accepted."""
        for name, group in GROUPS.items():
            obj = getattr(self, name)
            for f in dataclasses.fields(group):
                value, meta = getattr(obj, f.name), f.metadata
                if meta.get("choices"):
                    valid = choices(meta["choices"])
                    if value not in valid:
                        raise ValueError(f"unknown {f.name} {value!r}; choose one of: {', '.join(valid)}")
                # nan slips past the minimum check below, and inf is no usable ratio or rate.
                if f.type in ("float", float) and isinstance(value, float) and not math.isfinite(value):
                    at_least = f" >= {meta['min']:g}" if meta.get("min") is not None else ""
                    raise ValueError(f"{f.name} must be a finite number{at_least}, got {value!r}")
                if meta.get("min") is not None and value < meta["min"]:
                    raise ValueError(f"{f.name} must be >= {meta['min']:g}, got {value!r}")
        self.train.lr_drop_epochs()
        if self.train.pre_epochs and self.model.init_from:
            raise ValueError(f"init_from={self.model.init_from!r} and pre_epochs={self.train.pre_epochs} "
                             f"both choose the starting weights; set one of them")
        return self

    def config_hash(self) -> str:
        """A short digest of what the run computes (every field but the naming ones, values
        in their field's type so 10 and 10.0 agree). A sweep skips a cell whose hash already
        has a FINISHED run; jobs log it as the `config_hash` tag, and their checkpoints live
        under it.

        At compression 1 nothing is pruned, so the pruner and its settings change nothing:
        they are left out, and Rand, SNIP, GraSP and SynFlow at 1x with the same seed are
        one configuration (the dense network), run once."""
        flat = self.flat()
        # The rounds actually run, so that iterations=0 (the pruner's default) and that
        # default written out are one configuration, whether or not `resolve` ran first.
        flat["iterations"] = resolved_iterations(self)
        if self.dense():
            flat = {k: v for k, v in flat.items() if k not in PRUNING_FIELDS}
        return _digest(flat, skip=NAMING_FIELDS)

    def dense(self) -> bool:
        """Whether the job prunes nothing (compression 1, no ablation that changes weights)."""
        return self.prune.compression == 1 and not self.prune.reinit

    def pretrain_hash(self) -> str:
        """A digest of what the pre-training computes: the data, model, seed and training
        settings, not the pruning or the post-pruning epochs. Jobs that agree on it share
        one pre-training run."""
        flat = self.flat()
        return _digest({k: flat[k] for k in PRETRAIN_FIELDS}, skip=())


def default_iterations(pruner: str) -> int:
    """The rounds a pruner runs when `iterations` is 0."""
    return DEFAULT_ITERATIONS.get(pruner, 1)


def resolved_iterations(cfg: JobConfig) -> int:
    """The rounds `cfg` prunes for: its `iterations`, or the pruner's default when 0."""
    return cfg.prune.iterations or default_iterations(cfg.prune.pruner)


def resolve(cfg: JobConfig) -> JobConfig:
    """Fill the fields whose default depends on other fields (in place), so that the run
    logs the values it used."""
    cfg.prune.iterations = resolved_iterations(cfg)
    return cfg


def default_run_name(cfg: JobConfig) -> str:
    """The name a run gets when none is given: model-pruner-compression-sSEED."""
    return f"{cfg.model.model}-{cfg.prune.pruner}-{cfg.prune.compression:g}x-s{cfg.run.seed}"


def run_name(cfg: JobConfig) -> str:
    """The run's MLflow name: the `run_name` option, else the default name."""
    return cfg.run.run_name or default_run_name(cfg)


def value_before(name: str) -> str | None:
    """What a run logged before field `name` existed did, as a string (its `hash_omits`
    value), or None: how readers of older runs fill a setting those runs did not log."""
    for f in fields():
        if f.name == name and f.metadata.get("hash_omits", _NO_VALUE) is not _NO_VALUE:
            return str(f.metadata["hash_omits"])
    return None


def _digest(flat: dict[str, Any], skip: tuple[str, ...]) -> str:
    types = {f.name: f for f in fields()}
    values = {k: coerce(types[k], v) for k, v in flat.items() if k not in skip}
    values = {k: v for k, v in values.items() if v != types[k].metadata.get("hash_omits", _NO_VALUE)}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# Fields that name a run or say where it keeps its files, rather than change what it computes.
NAMING_FIELDS = ("experiment", "run_name", "resume", "checkpoint_dir")
# Fields that only matter when something is pruned.
PRUNING_FIELDS = ("pruner", "scope", "iterations", "schedule", "prune_mode", "prune_per_class",
                  "prune_batch_size", "shuffle", "invert")
# Fields a pre-training depends on.
PRETRAIN_FIELDS = ("dataset", "data_dir", "train_subset", "test_subset", "model", "optimizer", "lr",
                   "weight_decay", "lr_drops", "lr_drop_rate", "batch_size", "test_batch_size", "pre_epochs",
                   "pre_patience", "precision", "compile", "seed", "device")


GROUPS = {"data": DataConfig, "model": ModelConfig, "prune": PruneConfig, "train": TrainConfig,
          "run": RunConfig}


def fields() -> list[dataclasses.Field]:
    """Every hyperparameter field, in group order."""
    return [f for group in GROUPS.values() for f in dataclasses.fields(group)]


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """`value` as field `f`'s type (from YAML or JSON: 10 for a float, "true" for a bool);
    ValueError naming the field and the type it takes."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ValueError(f"{f.name} takes a{'n' if kind == 'int' else ''} {kind}, got {value!r}")


def choices(registry: str) -> list[str]:
    """The valid names for a registry-backed field."""
    return list(REGISTRIES[registry])


def check_registry(registry: str, names) -> None:
    """Fail on import when a registry's keys differ from the names listed above (a name
    added in one place only would be refused by the command line, or accepted there and
    then fail in the job)."""
    if tuple(names) != REGISTRIES[registry]:
        raise RuntimeError(f"the {registry} registry holds {tuple(names)}, but prunetrack.config lists "
                           f"{REGISTRIES[registry]}: update config.{registry.upper()}")
