"""Small ResNets trained from scratch: width-reduced grid encoders (RDAN, the contrastive model on
CPU) and the dense (stride-1) backbone for attention grounding (grounding-mcb-attention, §2.1, §3).

The grounding model reads its attention map at the input resolution, so the backbone is
torchvision's ResNet-18 layout (BasicBlock x [2, 2, 2, 2]) with the max pooling removed and every
stride set to 1 (§2.1: "we remove all the max pooling layers"; §3: "We modify the stride in all
convolutional layers to be 1"). Parameter names follow torchvision (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0`` ...), so at ``width=64, in_channels=3`` the state dict
has exactly the keys and shapes of ``torchvision.models.resnet18`` without ``fc``.

Cost: every layer runs at full resolution, about 46 GMACs per 64x64 image at width 64 (layer4
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


RESNET_BLOCKS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class GridBackbone(nn.Module):
    """A small ResNet trained from scratch whose last feature map's cells serve as regions (RDAN's
    grid features; with ``grid=1``, a width-reduced pooled encoder for the contrastive model).

    ``width`` is the first stage's channels (64 = torchvision's widths; 16 trains on 2 CPU cores).
    The stem is a stride-2 3x3 conv (no max-pool: digit scenes are 64 px), then four stages of
    BasicBlocks with strides 1, 2, 2, 2, so a 64 px image gives a 4 x 4 map; the map is average-
    pooled to ``grid`` x ``grid`` cells when it is larger. Output: (B, grid*grid, 8*width).
    """

    def __init__(self, blocks: tuple[int, ...] = (1, 1, 1, 1), width: int = 16, grid: int = 4):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers, inplanes = [], width
        for stage, n_blocks in enumerate(blocks):
            planes, stride = width * 2**stage, 1 if stage == 0 else 2
            for b in range(n_blocks):
                down = None
                if b == 0 and (stride != 1 or inplanes != planes):
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
                layers.append(BasicBlock(inplanes, planes, stride if b == 0 else 1, down))
                inplanes = planes
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_dim, self.grid = inplanes, grid
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images))  # (B, C, h, w)
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            x = self.pool(x)
        return x.flatten(2).transpose(1, 2)  # (B, grid*grid, C): one region per cell


__all__ = ["StrideOneResNet", "resnet18_stride1", "DigitClassifier", "RESNET18_LAYERS", "RESNET_BLOCKS", "GridBackbone"]
