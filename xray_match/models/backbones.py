"""Dense (stride-1) backbones for attention grounding (paper: grounding-mcb-attention, §2.1, §3).

The grounding model reads its attention map at the input resolution, so the backbone is
torchvision's ResNet-18 layout (BasicBlock x [2, 2, 2, 2]) with the max pooling removed and every
stride set to 1 (§2.1: "we remove all the max pooling layers"; §3: "We modify the stride in all
convolutional layers to be 1"). Parameter names follow torchvision (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0`` ...), so at ``width=64, in_channels=3`` the state dict
has exactly the keys and shapes of ``torchvision.models.resnet18`` without ``fc``.

Cost: every layer runs at full resolution, about 51 GMACs per 64x64 image at width 64 (layer4
alone is 8x the base width at 64x64). ``width`` scales all channels; compute falls with width².
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

RESNET18_LAYERS = (2, 2, 2, 2)


class StrideOneResNet(nn.Module):
    """ResNet-18 without max pooling, all strides 1: ``(B, in_channels, H, W) -> (B, 8*width, H, W)``."""

    def __init__(self, width: int = 64, in_channels: int = 3, layers: tuple[int, ...] = RESNET18_LAYERS):
        super().__init__()
        if width < 1 or in_channels < 1:
            raise ValueError(f"StrideOneResNet: width ({width}) and in_channels ({in_channels}) must be >= 1")
        self.width, self.in_channels = width, in_channels
        # the stem keeps torchvision's 7x7 kernel (padding 3) but with stride 1
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=1, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            setattr(self, f"layer{i + 1}", _layer(inplanes, planes, n))
            inplanes = planes
        self.out_channels = inplanes
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w, H, W): no max pooling
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w, H, W)


def _layer(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    # torchvision adds a projection shortcut whenever the channel count changes; stride stays 1
    down = None if inplanes == planes else nn.Sequential(conv1x1(inplanes, planes, 1), nn.BatchNorm2d(planes))
    return nn.Sequential(BasicBlock(inplanes, planes, 1, down), *(BasicBlock(planes, planes) for _ in range(blocks - 1)))


def resnet18_stride1(width: int = 64, in_channels: int = 3) -> StrideOneResNet:
    """The paper's backbone (§3); ``width < 64`` is the CPU-sized variant of the same layout."""
    return StrideOneResNet(width, in_channels, RESNET18_LAYERS)


class DigitClassifier(nn.Module):
    """Stage 1 (§3): the backbone + global average pooling + a linear classifier, trained on
    single MNIST digits. Only ``backbone`` is carried into the grounding model."""

    def __init__(self, backbone: StrideOneResNet, num_classes: int = 10):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)  # (B, C, H, W)
        return self.fc(f.mean(dim=(2, 3)))  # (B, num_classes)


__all__ = ["StrideOneResNet", "resnet18_stride1", "DigitClassifier", "RESNET18_LAYERS"]
