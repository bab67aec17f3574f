"""Non-overlapping average pooling (window = stride, ceil mode), the reduction inside every pooling method.

On contiguous NCHW CPU tensors, ``F.avg_pool2d`` with 2x2 windows is several times slower than two strided
additions (forward and backward), so stride 2 on even-sized maps takes that route; everything else, tracing
and scripting included, is ``F.avg_pool2d``. Both compute the same window mean (tested against each other).
"""
import torch
from torch import nn
from torch.nn import functional as F

from timm.layers import register_notrace_module

__all__ = ['window_avg_pool2d', 'WindowAvgPool2d']


def window_avg_pool2d(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Mean over ``stride x stride`` windows, output ``ceil(H / stride) x ceil(W / stride)``."""
    if (torch.jit.is_tracing() or torch.jit.is_scripting() or stride != 2 or x.dim() != 4
            or x.shape[-2] % 2 or x.shape[-1] % 2 or x.device.type != 'cpu' or not x.is_contiguous()):
        return F.avg_pool2d(x, stride, stride, ceil_mode=True)
    B, C, H, W = x.shape
    rows = x.view(B, C, H // 2, 2 * W)
    rows = rows[..., :W] + rows[..., W:]
    cols = rows.view(B, C, H // 2, W // 2, 2)
    return (cols[..., 0] + cols[..., 1]).mul_(0.25)


@register_notrace_module
class WindowAvgPool2d(nn.Module):
    """Average pooling with kernel = stride and ceil mode (``avgp``)."""

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_avg_pool2d(x, self.stride)

    def extra_repr(self) -> str:
        return f'stride={self.stride}'
