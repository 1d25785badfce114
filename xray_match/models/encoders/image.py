"""Image backbones: torchvision ResNets with the classifier removed."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

#: ResNets without a torchvision builder: name -> (block, layers)
_SMALL = {"resnet10": (BasicBlock, [1, 1, 1, 1])}


def build_resnet(name: str, pretrained: bool = False, width: int = 0) -> tuple[nn.Module, int]:
    """``(backbone, feature_dim)``: a torchvision ResNet returning pooled features (B, C).

    ``pretrained`` loads torchvision's ImageNet weights (a download; needs a hub). ``resnet10``
    (one BasicBlock per stage, 512-d) is the CPU-sized default where no weights ship. ``width`` > 0
    builds a width-reduced BasicBlock ResNet (resnet10/18/34 depths, first stage ``width`` channels,
    8 * ``width``-d output; compute falls with width²) for small images on CPU, from scratch.
    """
    if width:
        from xray_match.models.backbones import RESNET_BLOCKS, GridBackbone

        if name not in RESNET_BLOCKS or pretrained:
            raise ValueError(f"vision backbone {name!r} with width {width}: only {sorted(RESNET_BLOCKS)} "
                             "from scratch (pretrained=false) have a reduced width")
        grid = GridBackbone(RESNET_BLOCKS[name], width=width, grid=1)
        return nn.Sequential(grid, nn.Flatten(1)), grid.out_dim  # (B, 1, C) -> (B, C)
    if name in _SMALL:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights exist; set vision_pretrained=false")
        block, layers = _SMALL[name]
        net: nn.Module = ResNet(block, layers)
    else:
        try:
            net = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
        except ValueError as e:
            raise ValueError(f"unknown vision backbone {name!r}: {e}") from None
    if not hasattr(net, "fc"):
        raise ValueError(f"vision backbone {name!r} is not a ResNet-style model with .fc")
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class GridFeatures(nn.Module):
    """A ResNet's last feature map as a set of regions: (B, 3, H, W) -> (B, h*w, C)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*(getattr(backbone, n) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)  # (B, C, h, w)
        return f.flatten(2).transpose(1, 2)  # (B, h*w, C)
