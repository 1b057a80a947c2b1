"""A small CNN for 8x8 digit images (scikit-learn's digits), used by the demo and tests."""

from __future__ import annotations

from torch import Tensor, nn

from ..spec import check_int
from ._registry import register_model

__all__ = ["DigitsCNN", "digits_cnn"]


class DigitsCNN(nn.Module):
    """conv3x3(1->16) - [conv1x1(16->64) - conv3x3(64->64, stride 2)] x 2 - conv1x1 - pool - linear.

    Plain ``nn.Conv2d`` layers throughout, each followed by BN-ReLU; ``dynaconv.convert``
    turns them into any family. Widths are powers of two so that every family applies.
    """

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        check_int(num_classes, "num_classes")
        check_int(width, "width")

        def block(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(1, 16, 3),
            *block(16, width, 1),
            *block(width, width, 3),
            *block(width, width, 1),
            *block(width, width, 3, stride=2),
            *block(width, width, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model
def digits_cnn(num_classes: int = 10, width: int = 64) -> DigitsCNN:
    """The demo's small CNN for 8x8 digits."""
    return DigitsCNN(num_classes, width)
