"""The model zoo: the sizes the pruning literature reports, and every model's shapes."""
from __future__ import annotations

import pytest
import torch
from torchinfo import summary

from prunetrack import masking, models


@pytest.mark.parametrize("name, millions", [("vgg16", 14.72), ("resnet50", 23.52), ("resnet20", 0.27)])
def test_parameter_counts(name, millions):
    stats = summary(models.get_model(name), input_size=(1, 3, 32, 32), verbose=0)
    assert stats.total_params / 1e6 == pytest.approx(millions, abs=0.01)


def test_prunable_weights_are_conv_and_linear():
    model = models.get_model("vgg16")
    layers = masking.prunable_layers(model)
    assert len(layers) == 14  # 13 convolutions and the classifier
    # 3x3 kernels: 3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 2*256*256 + 256*512 + 5*512*512 in-out pairs.
    assert sum(m.weight.numel() for m in layers.values()) == 9 * 1_634_496 + 512 * 10


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_model_classifies_a_cifar_batch(name):
    torch.manual_seed(0)
    model = models.get_model(name, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'vgg17'.*resnet50"):
        models.get_model("vgg17")
