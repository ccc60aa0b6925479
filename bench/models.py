"""Models the benchmarks share that the test zoo does not hold (no torchvision here)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with batch norm, identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 layout, 11.2 M parameters at width 64; input (N, 3, H, W).

    ``stem="cifar"``: one 3x3 stride-1 convolution (32 x 32 inputs);
    ``stem="imagenet"``: torchvision's 7x7 stride-2 convolution and a 3x3 stride-2
    max pool (224 x 224 inputs: the blocks see 56 x 56 down to 7 x 7).
    """

    def __init__(self, classes: int = 10, width: int = 64, stem: str = "cifar") -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"expected stem 'cifar' or 'imagenet', got {stem!r}")
        imagenet = stem == "imagenet"
        self.stem = nn.Conv2d(
            3,
            width,
            7 if imagenet else 3,
            2 if imagenet else 1,
            3 if imagenet else 1,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()
        plan = [(1, 1), (1, 1), (2, 2), (2, 1), (4, 2), (4, 1), (8, 2), (8, 1)]
        blocks, cin = [], width
        for mult, stride in plan:
            blocks.append(BasicBlock(cin, mult * width, stride))
            cin = mult * width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.bn(self.stem(x))))
        return self.fc(self.layers(x).mean((2, 3)))
