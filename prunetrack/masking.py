"""Masks beside weights, as in torch.nn.utils.prune: every prunable layer (Conv2d or
Linear) carries a boolean buffer `prune_mask` of the weight's shape. (Not named
`weight_mask`, the buffer torch.nn.utils.prune adds when it prunes `weight`, so that
both can sit on one layer.)

Unlike torch.nn.utils.prune we do not recompute `weight * mask` on every forward
(that costs a pass over the weights in the forward and again in the backward).
Pruned weights are set to zero once, and `apply_masks` re-zeroes them after each
optimizer step, so they stay exactly zero through training whatever the
optimizer's momentum or weight decay does with their gradients.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear)
MASK = "prune_mask"  # the buffer's name; state dict keys end in ".prune_mask"


def is_mask_key(key: str) -> bool:
    """Whether a state dict key names a mask buffer (weights files leave them out)."""
    return key.rsplit(".", 1)[-1] == MASK


def masks_in(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer name -> mask, from a model's state dict."""
    return {k[:-len(MASK) - 1]: v for k, v in state.items() if is_mask_key(k)}


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every layer whose weight may be pruned, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def add_masks(model: nn.Module) -> nn.Module:
    """Give every prunable layer an all-True `prune_mask` (if it has none yet)."""
    for m in prunable_layers(model).values():
        if not hasattr(m, MASK):
            m.register_buffer(MASK, torch.ones_like(m.weight, dtype=torch.bool))
    return model


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.prune_mask for name, m in prunable_layers(model).items()}


@torch.no_grad()
def set_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Install masks (by layer name) and zero the pruned weights."""
    layers = prunable_layers(model)
    if set(masks) != set(layers):
        raise ValueError(f"masks do not match the model's prunable layers: "
                         f"missing {sorted(set(layers) - set(masks))}, unexpected {sorted(set(masks) - set(layers))}")
    for name, m in layers.items():
        mask = masks[name].to(device=m.weight.device, dtype=torch.bool)
        if mask.shape != m.weight.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight has {tuple(m.weight.shape)}")
        if hasattr(m, MASK):
            m.prune_mask.copy_(mask)
        else:
            m.register_buffer(MASK, mask.clone())
    apply_masks(model)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every pruned weight (call after each optimizer step)."""
    for m in prunable_layers(model).values():
        m.weight.mul_(m.prune_mask)


def count(model: nn.Module) -> tuple[int, int]:
    """(prunable weights, surviving prunable weights)."""
    masks = get_masks(model).values()
    return sum(m.numel() for m in masks), int(sum(int(m.sum()) for m in masks))


def save_masks(masks: dict[str, torch.Tensor], f) -> None:
    """Write masks compactly: one bit per weight (np.packbits) plus each shape.
    `f` is a path or a binary file object."""
    packed = {name: {"shape": tuple(m.shape), "bits": torch.from_numpy(np.packbits(m.cpu().numpy().ravel()))}
              for name, m in masks.items()}
    torch.save({"format": "prunetrack-masks-v1", "masks": packed}, f)


def masks_with_counts(model: nn.Module, counts: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Masks (layer name -> bool tensor) for `model`'s prunable layers with exactly
    `counts[name]` survivors each, at seeded random places: what dense kernels time like
    the masks those counts came from."""
    layers = prunable_layers(model)
    if set(counts) != set(layers):
        raise ValueError(f"counts do not match the model's prunable layers: missing {sorted(set(layers) - set(counts))}, "
                         f"unexpected {sorted(set(counts) - set(layers))}")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in layers.items():
        flat = torch.zeros(m.weight.numel(), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=generator)[:counts[name]]] = True
        out[name] = flat.view(m.weight.shape)
    return out


def load_masks(source: str) -> dict[str, torch.Tensor]:
    """Masks (layer name -> bool tensor) from a file written by `save_masks`, or from an
    MLflow run: `runs:/<run_id>` or any artifact URI of the run's `masks.pt`.

    >>> masks = load_masks("runs:/0123abcd")          # doctest: +SKIP
    >>> prunetrack.masking.set_masks(model, masks)     # doctest: +SKIP
    """
    if "://" in source or source.startswith("runs:/"):
        import mlflow

        uri = source if source.rstrip("/").endswith("masks.pt") else source.rstrip("/") + "/masks.pt"
        source = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    with open(source, "rb") as fh:
        blob = torch.load(io.BytesIO(fh.read()), weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "prunetrack-masks-v1":
        raise ValueError(f"{source} is not a prunetrack masks file")
    out = {}
    for name, entry in blob["masks"].items():
        n = int(np.prod(entry["shape"]))
        bits = np.unpackbits(entry["bits"].numpy(), count=n)
        out[name] = torch.from_numpy(bits.astype(bool)).reshape(entry["shape"])
    return out
