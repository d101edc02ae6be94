"""Sweep specs: a YAML grid of prune jobs, expanded into validated cells.

A spec (see `sweeps/`)::

    name: study-vgg16                  # parent run `sweep-<name>`, tag `sweep` on every cell
    experiment: prunetrack             # where the runs go (default: prunetrack)
    base: {model: vgg16_bn, post_epochs: 10}      # any `prunetrack prune` option, by field name
    grid:                              # axes: every combination is one cell
      pruner: [rand, mag, snip, grasp, synflow]
      compression: [1, 2, 5, 10, 15, 20]
    # grid: [{...}, {...}]             # or a list of grids, run one after another
    overrides:                         # fields set on the cells that match `when`
      - when: {pruner: mag}            #   (a value, or a list of values to match any)
        set: {pre_epochs: 200}

Every cell's configuration is built with the same dataclasses as `prunetrack prune`
and validated here, before anything runs (prunetrack.sweep runs them).
"""
from __future__ import annotations

import difflib
import itertools
import os
from dataclasses import dataclass
from typing import Any

import yaml

from prunetrack import config
from prunetrack.config import JobConfig

SPEC_KEYS = ("name", "description", "experiment", "base", "grid", "overrides")
# Shown in a run's name when they vary; any other varying field is appended as -field=value.
NAME_FIELDS = ("model", "pruner", "compression", "seed")


class SpecError(ValueError):
    """A sweep spec that cannot run; the message names the file and the bad key."""


@dataclass
class Cell:
    key: str          # the grid coordinates, e.g. "pruner=mag,compression=10": the `cell` tag
    name: str         # the run name
    config: JobConfig  # resolved, validated
    config_hash: str  # for a pre-training: its pretrain_hash
    kind: str = "prune"             # or "pretrain": the shared pre-training some cells start from
    shared_with: str | None = None  # the key of the cell that computes this one (the dense cell at 1x)

    @property
    def checkpoint_key(self) -> str:
        """Its folder under the checkpoint root, as the job that runs it names it."""
        from prunetrack.checkpoint import pretrain_key  # torch, which a spec's reader does not need

        return pretrain_key(self.config_hash) if self.kind == "pretrain" else self.config_hash


@dataclass
class Spec:
    name: str
    experiment: str
    cells: list[Cell]
    text: str         # the file as written, logged with the parent run
    description: str = ""  # the spec's `description`, the parent run's Description in the MLflow UI

    def plan(self, done=frozenset()) -> list[Cell]:
        """What runs, in order: the cells (skipping those another cell computes), each
        shared pre-training placed just before the first cell that starts from it and is not
        in `done` (config hashes of finished cells). A study resumed where the weights of its
        pre-training are gone trains it again only when its next cell needs it, not before
        the cells that need none (hours of a CPU sitting)."""
        out, seen = [], set()
        for cell in self.cells:
            if cell.shared_with:
                continue
            cfg = cell.config
            if cfg.train.pre_epochs and cell.config_hash not in done and cfg.pretrain_hash() not in seen:
                seen.add(cfg.pretrain_hash())
                out.append(pretrain_cell(cell))
            out.append(cell)
        return out


def pretrain_cell(cell: Cell) -> Cell:
    cfg, t = cell.config, cell.config.train
    name = f"{cfg.model.model}-pretrain-{t.pre_epochs}ep-s{cfg.run.seed}"
    return Cell(key=f"pretrain:{name}", name=name, config=cfg, config_hash=cfg.pretrain_hash(), kind="pretrain")


def load_spec(path: str) -> Spec:
    """Read and validate a spec: every key, every value, every cell's configuration."""
    try:
        with open(path) as f:
            text = f.read()
        raw = yaml.safe_load(text)
    except OSError as e:
        raise SpecError(f"cannot read sweep spec {path}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None
    try:
        return parse_spec(raw, default_name=os.path.splitext(os.path.basename(path))[0], text=text)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


def parse_spec(raw: Any, default_name: str = "sweep", text: str = "") -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"a sweep spec is a mapping with keys {', '.join(SPEC_KEYS)}; got {type(raw).__name__}")
    for key in raw:
        if key not in SPEC_KEYS:
            raise SpecError(f"unknown key {key!r}{_hint(key, SPEC_KEYS)}; a spec takes: {', '.join(SPEC_KEYS)}")
    name = raw.get("name", default_name)
    experiment = raw.get("experiment", config.RunConfig.experiment)
    for key, value in (("name", name), ("experiment", experiment)):
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{key} must be a non-empty string, got {value!r}")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise SpecError(f"description must be a string (markdown), got {description!r}")

    base = _values(raw.get("base") or {}, "base")
    grid_raw = raw.get("grid") or {}
    # One grid, or a list of grids run one after another (e.g. a row at a longer training
    # budget between two parts of a sweep); each is a mapping of axes to lists of values.
    grids = [_grid(g, f"grid[{i}]") for i, g in enumerate(grid_raw)] if isinstance(grid_raw, list) \
        else [_grid(grid_raw, "grid")]

    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list):
        raise SpecError(f"overrides must be a list of {{when: ..., set: ...}} entries, got {overrides!r}")
    rules = []
    for i, rule in enumerate(overrides):
        where = f"overrides[{i}]"
        if not isinstance(rule, dict) or set(rule) != {"when", "set"}:
            raise SpecError(f"{where} must have exactly the keys 'when' and 'set', got {rule!r}")
        if not isinstance(rule["when"], dict) or not rule["when"]:
            raise SpecError(f"{where}.when must map field names to a value or a list of values")
        when = {k: [_values({k: v}, f"{where}.when.{k}")[k] for v in (vs if isinstance(vs, list) else [vs])]
                for k, vs in rule["when"].items()}
        rules.append((when, _values(rule["set"], f"{where}.set")))
    if not grids or not all(grids):  # otherwise the sweep would silently be one job of the base settings
        raise SpecError(f"spec {name!r} has no grid: list at least one axis, e.g. grid: {{seed: [0]}} "
                        f"(a single job is `prunetrack prune`)")

    cells = []
    for grid in grids:
        for combo in itertools.product(*grid.values()):
            point = dict(zip(grid, combo))
            values = {**base, **point}
            for when, changes in rules:
                if all(values.get(k, _default(k)) in vs for k, vs in when.items()):
                    values.update(changes)
            cells.append(_cell(point, values, experiment))

    seen: dict[str, str] = {}
    for cell in cells:
        if cell.config_hash in seen:
            if cell.config.dense():  # nothing is pruned at 1x: the pruners share one dense network
                cell.shared_with = seen[cell.config_hash]
                continue
            raise SpecError(f"cells {seen[cell.config_hash]} and {cell.key} have the same configuration "
                            f"(a repeated grid value, or an override that undoes an axis)")
        seen[cell.config_hash] = cell.key
    return Spec(name=name, experiment=experiment, cells=cells, text=text, description=description.strip())


def _grid(raw: Any, where: str) -> dict[str, list]:
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must map field names to lists of values, got {raw!r}")
    grid: dict[str, list] = {}
    for key, values in raw.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
        grid[key] = [_values({key: v}, f"{where}.{key}")[key] for v in values]
    return grid


def _values(mapping: Any, where: str) -> dict[str, Any]:
    """Check that `mapping`'s keys are configuration fields the spec may set, and coerce
    its values to their fields' types."""
    if not isinstance(mapping, dict):
        raise SpecError(f"{where} must map configuration fields to values, got {mapping!r}")
    fields = {f.name: f for f in config.fields()}
    out = {}
    for key, value in mapping.items():
        if key in config.NAMING_FIELDS:
            owner = "the spec's top-level 'experiment'" if key == "experiment" else "the sweep, per cell"
            raise SpecError(f"{where}: {key!r} cannot be set here; it is set by {owner}")
        if key not in fields:
            raise SpecError(f"{where}: unknown configuration key {key!r}{_hint(key, fields)}; "
                            f"see `prunetrack prune --help` for the fields")
        if isinstance(value, (dict, list)) or value is None:
            raise SpecError(f"{where}: {key} takes a single value, got {value!r}")
        try:
            out[key] = config.coerce(fields[key], value)
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None
    return out


def _default(key: str) -> Any:
    for f in config.fields():
        if f.name == key:
            return f.default
    raise KeyError(key)


def _cell(point: dict[str, Any], values: dict[str, Any], experiment: str) -> Cell:
    key = ",".join(f"{k}={_fmt(v)}" for k, v in point.items())
    try:
        cfg = JobConfig.from_flat(values).validate()
    except (ValueError, TypeError) as e:
        raise SpecError(f"cell {key}: {e}") from None
    config.resolve(cfg)
    name = config.default_run_name(cfg)
    name += "".join(f"-{k}={_fmt(v)}" for k, v in point.items() if k not in NAME_FIELDS)
    cfg.run.experiment, cfg.run.run_name = experiment, name
    return Cell(key=key, name=name, config=cfg, config_hash=cfg.config_hash())


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _hint(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
