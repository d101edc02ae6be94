"""The model zoo: CIFAR-sized VGG, CIFAR ResNets and ResNet-50.

Every model takes 32x32 RGB input. Names follow torchvision (`vgg16`, `vgg16_bn`,
`resnet50`); `get_model(name, num_classes)` is the one way in, and `MODELS` lists
the choices. Prunable weights are those of Conv2d and Linear layers
(see `prunetrack.masking`), so nothing here knows about pruning.
"""
from __future__ import annotations

import torch
from torch import nn

from prunetrack import config

# "M" is a 2x2 max-pool. Four pools take 32x32 down to 2x2; a final 2x2 *average*
# pool then gives the classifier a 512-wide vector. This is the CIFAR VGG of the
# pruning-at-initialization literature (open_lth's, which Synaptic-Flow's `lottery`
# models copy): one Linear layer, no 4096-wide head.
VGG_PLANS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    def __init__(self, plan: list, num_classes: int = 10, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in plan:
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            # A bias before BatchNorm is redundant (BN subtracts the mean).
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
        layers.append(nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Every Conv2d and the classifier: He-normal in fan-in mode, std sqrt(2 / fan_in)
        # (kaiming_normal_'s defaults), biases zero. The classifier's init matters to
        # magnitude pruning: a much smaller one (N(0, 0.01)) would rank its weights last.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; a 1x1 projection on the shortcut when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _projection(cin, width, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """A ResNet with a CIFAR stem: one 3x3 stride-1 convolution and no max-pool."""

    def __init__(self, block, blocks_per_stage: list[int], widths: list[int], num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, (n, width) in enumerate(zip(blocks_per_stage, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, width, stride))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def _vgg(depth: int, batch_norm: bool):
    return lambda num_classes=10: VGG(VGG_PLANS[depth], num_classes, batch_norm)


def _cifar_resnet(depth: int):
    assert (depth - 2) % 6 == 0
    n = (depth - 2) // 6
    return lambda num_classes=10: ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes)


# The registry of named choices: name -> constructor(num_classes).
MODELS = {
    **{f"vgg{d}": _vgg(d, False) for d in VGG_PLANS},
    **{f"vgg{d}_bn": _vgg(d, True) for d in VGG_PLANS},
    **{f"resnet{d}": _cifar_resnet(d) for d in (20, 32, 44, 56, 110)},
    "resnet50": lambda num_classes=10: ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes),
}
config.check_registry("models", MODELS)


def get_model(name: str, num_classes: int = 10) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes)
