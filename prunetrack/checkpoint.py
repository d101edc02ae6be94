"""Per-epoch checkpoints in a local cache, so that a job killed at any moment resumes
from its last finished epoch.

One folder per configuration (its `config_hash`; a shared pre-training's is
`pretrain-<pretrain_hash>`) under the checkpoint root (the
`checkpoint_dir` option, else $PRUNETRACK_CHECKPOINT_DIR, else
~/.cache/prunetrack/checkpoints). It holds `state.pt`, written atomically (a temporary
file renamed over the old one, so a kill during the write leaves the previous epoch's
state intact), and `lock`, held with flock by the process that runs the configuration:
a second process running the same configuration is refused rather than interleaving
its epochs, and the kernel releases the lock when the holder dies, even by SIGKILL.

The folder is deleted when the job's run ends FINISHED; a failed or interrupted job
keeps it, and running the same configuration again picks it up. `prunetrack sweep
--dry-run` names the folders that no cell of its spec would pick up.
"""
from __future__ import annotations

import collections
import fcntl
import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from prunetrack import masking

FORMAT = "prunetrack-checkpoint-v1"
PROGRESS = "progress.json"
PROGRESS_KEYS = ("phase", "epoch", "epochs", "run_id")
ENV = "PRUNETRACK_CHECKPOINT_DIR"


def root(checkpoint_dir: str = "") -> str:
    """The checkpoint root: the option, else $PRUNETRACK_CHECKPOINT_DIR, else the user cache."""
    chosen = checkpoint_dir or os.environ.get(ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "prunetrack", "checkpoints")
    return os.path.abspath(os.path.expanduser(chosen))


class CheckpointBusy(RuntimeError):
    """Another live process holds this configuration's checkpoint."""


class NotResumable(RuntimeError):
    """A checkpoint that this machine cannot continue as it was begun (another precision)."""


class Checkpoint:
    """The checkpoint folder of one configuration. Use as a context manager: entering
    takes the lock (CheckpointBusy if another process holds it), leaving releases it."""

    def __init__(self, checkpoint_dir: str, key: str, wait: bool = False):
        self.wait = wait
        self.folder = os.path.join(root(checkpoint_dir), key)
        self.path = os.path.join(self.folder, "state.pt")
        self.progress_path = os.path.join(self.folder, PROGRESS)
        self._lock = None

    def __enter__(self) -> "Checkpoint":
        os.makedirs(self.folder, exist_ok=True)
        self._lock = open(os.path.join(self.folder, "lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            if self.wait:
                print(f"waiting for process {holder}, which is running this work now ({self.folder})", flush=True)
                fcntl.flock(self._lock, fcntl.LOCK_EX)
                return self._claim()
            self._lock.close()
            self._lock = None
            raise CheckpointBusy(f"another process (pid {holder}) is running this configuration right now "
                                 f"(it holds {self.folder}); wait for it, or stop it and run again to resume "
                                 f"its last finished epoch") from None
        return self._claim()

    def _claim(self) -> "Checkpoint":
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it is not ours)."""
        if not os.path.isfile(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # a file from another version, or damaged: start over, but say so
            print(f"ignoring unreadable checkpoint {self.path} ({type(e).__name__}: {e})", flush=True)
            return None
        if not (isinstance(state, dict) and state.get("format") == FORMAT):
            return None
        # Checkpoints written before the mask buffer was renamed hold ".weight_mask" keys;
        # renamed here, a job interrupted then resumes with the current code.
        for holder in (state, state.get("best")):
            if isinstance(holder, dict) and isinstance(holder.get("model"), dict):
                holder["model"] = _renamed_masks(holder["model"])
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` atomically: a kill during the write keeps the previous one."""
        tmp = self.path + ".tmp"
        torch.save({"format": FORMAT, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # A few bytes that say where the state stands, for `sweep --dry-run` (which
        # should not read hundreds of MB per cell).
        summary = {k: state.get(k) for k in PROGRESS_KEYS}
        with open(self.progress_path + ".tmp", "w") as f:
            json.dump(summary, f)
        os.replace(self.progress_path + ".tmp", self.progress_path)

    def progress(self) -> dict[str, Any] | None:
        """Where the saved state stands ({phase, epoch, epochs, run_id}), read from the few
        bytes beside it; None when there is no saved state."""
        if not os.path.isfile(self.path):
            return None
        try:
            with open(self.progress_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def clear(self) -> None:
        """Forget the saved state (keep the folder and its lock while we hold it)."""
        for name in ("state.pt", "state.pt.tmp", PROGRESS):
            with _suppress_missing():
                os.remove(os.path.join(self.folder, name))

    def delete(self) -> None:
        """Remove the whole folder (the run finished: nothing left to resume)."""
        self.__exit__()
        shutil.rmtree(self.folder, ignore_errors=True)


OLD_MASK = "weight_mask"  # the mask buffer's name in checkpoints of earlier versions


def _renamed_masks(weights: dict[str, Any]) -> dict[str, Any]:
    """A state dict with its old-style mask keys (`<layer>.weight_mask`) renamed to the
    current buffer name, in the same order; torch's `_metadata` (per-module versions)
    is kept, as load_state_dict reads it."""
    out = collections.OrderedDict()
    for key, value in weights.items():
        prefix, dot, last = key.rpartition(".")
        out[prefix + dot + masking.MASK if last == OLD_MASK else key] = value
    metadata = getattr(weights, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global random stream a job on `device` draws from: on CUDA, its own GPU's
    only, so that a job resumed where fewer GPUs are visible (a sweep cell sees one) can
    restore it."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def pretrain_key(pretrain_hash: str) -> str:
    """The folder of a shared pre-training's checkpoint, apart from the prune jobs' (config_hash)."""
    return f"pretrain-{pretrain_hash}"


def saved(checkpoint_dir: str = "") -> dict[str, tuple[int, dict[str, Any] | None]]:
    """Every saved state under the checkpoint root: its key, its size in bytes and where
    it stands (`peek`)."""
    top = root(checkpoint_dir)
    out = {}
    for key in sorted(os.listdir(top)) if os.path.isdir(top) else []:
        path = os.path.join(top, key, "state.pt")
        if os.path.isfile(path):
            out[key] = (os.path.getsize(path), peek(checkpoint_dir, key))
    return out


def peek(checkpoint_dir: str, key: str) -> dict[str, Any] | None:
    """Where a configuration's saved state stands ({phase, epoch, epochs, run_id}), read
    without taking the lock; None when it has none."""
    return Checkpoint(checkpoint_dir, key).progress()
