"""The default model: a small CNN for 8x8 images whose norm layers come from fastnorm.nn."""
from __future__ import annotations

from torch import Tensor, nn

import fastnorm

__all__ = ["SmallCNN", "make_model"]


class ChannelLayerNorm(fastnorm.nn.LayerNorm):
    """LayerNorm over the channels of each pixel of an NCHW map (as in ConvNeXt)."""

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind in ("bn", "syncbn"):
        return fastnorm.nn.BatchNorm2d(channels)
    if kind == "gn":
        return fastnorm.nn.GroupNorm(min(8, channels), channels)
    if kind == "ln":
        return ChannelLayerNorm(channels)
    raise ValueError(f"unknown norm {kind!r}; expected bn, syncbn, gn or ln")


class SmallCNN(nn.Sequential):
    """conv-norm-relu x2, pool to 4x4, conv-norm-relu, pool to 2x2, conv-norm-relu, global
    average, linear. About 66k parameters at width 32."""

    def __init__(self, norm: str = "bn", width: int = 32, num_classes: int = 10) -> None:
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(norm, cout),
                    nn.ReLU(inplace=True)]
        super().__init__(*block(1, w), *block(w, w), nn.MaxPool2d(2),
                         *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 2 * w),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))


def make_model(norm: str, width: int, world: int, num_outputs: int = 10) -> nn.Module:
    """The CNN with fastnorm norm layers; with --norm syncbn on several ranks its BatchNorms
    become fastnorm.nn.SyncBatchNorm (statistics over the global micro-batch). num_outputs:
    classes, or the embedding (projection) dimension of the simclr task."""
    model = SmallCNN(norm, width, num_outputs)
    return fastnorm.convert(model, sync_batchnorm=(norm == "syncbn" and world > 1))
