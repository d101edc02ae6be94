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


@pytest.mark.parametrize("name", ["vgg11", "vgg13", "vgg16", "vgg19", "vgg16_bn"])
def test_vgg_is_the_cifar_vgg_of_the_pruning_literature(name):
    """Four max-pools, then a 2x2 average pool before the one Linear classifier
    (open_lth's / Synaptic-Flow's `lottery` VGG)."""
    model = models.get_model(name)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds.count("MaxPool2d") == 4
    assert kinds[-1] == "AvgPool2d" and model.features[-1].kernel_size == 2
    assert kinds.count("Conv2d") == int(name[3:5]) - 3
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.in_features == 512
    x = torch.randn(2, 3, 32, 32)
    assert model.features(x).shape == (2, 512, 1, 1)


def test_vgg_init_is_fan_in_kaiming_normal_for_every_layer():
    """std sqrt(2 / fan_in) for every Conv2d and the classifier, zero biases: the init
    that decides what magnitude pruning at initialization keeps."""
    torch.manual_seed(0)
    model = models.get_model("vgg16")
    for name, m in masking.prunable_layers(model).items():
        w = m.weight.detach()
        fan_in = w[0].numel()
        expected = (2.0 / fan_in) ** 0.5
        # The sample std of n normal draws is within a few 1/sqrt(2n) of the truth.
        assert w.std().item() == pytest.approx(expected, rel=max(0.02, 5 / (2 * w.numel()) ** 0.5)), name
        assert abs(w.mean().item()) < 5 * expected / w.numel() ** 0.5, name
        assert torch.count_nonzero(m.bias) == 0, name
    # The classifier is no longer orders of magnitude smaller than the convolutions.
    assert model.classifier.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05)


def test_vgg16_dense_flops():
    """Pools carry no multiply-accumulates, so the average pool leaves the dense count as it was."""
    from prunetrack import measure

    flops = measure.count_flops(models.get_model("vgg16"), torch.zeros(1, 3, 32, 32))
    assert flops.total / 2 == pytest.approx(0.313e9, rel=0.005)
