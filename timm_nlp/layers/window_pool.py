"""Non-overlapping window pooling (window = stride), the reduction inside every pooling method.

Floor mode, as the paper's ``nn.AvgPool2d(s, s)``: the output is ``H // s x W // s`` and rows or columns beyond the
last whole window are dropped. Where the map is smaller than the window (``H < s``), the paper's code crashes; here
the one window covers what there is, so the output has at least one position per axis. ``ceil_mode=True`` (the
in-block placement) gives ``ceil(H / s)`` with partial windows at the edges, averaged over their valid elements.

On contiguous NCHW CPU tensors, ``F.avg_pool2d`` with 2x2 windows is several times slower than two strided
additions (forward and backward), so stride 2 on even-sized maps takes that route; everything else, tracing and
scripting included, is ``F.avg_pool2d``. Both compute the same window mean (tested against each other).
"""
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from timm.layers import register_notrace_module

from .export_ops import ExportError, window_avg
from .protocol import PoolLayer, pool_output_size

__all__ = ['pool_output_size', 'window_avg_pool2d', 'window_max_pool2d', 'WindowAvgPool2d', 'WindowMaxPool2d']


def _window(x: torch.Tensor, stride: int) -> List[int]:
    """The window (= kernel) of a floor-mode pool: ``stride``, or the whole axis where the map is smaller (a
    constant either way, as ONNX's pooling kernels must be)."""
    h, w = x.shape[-2], x.shape[-1]
    return [stride if h >= stride else int(h), stride if w >= stride else int(w)]


def window_avg_pool2d(x: torch.Tensor, stride: int, ceil_mode: bool = False) -> torch.Tensor:
    """Mean over ``stride x stride`` windows (see the module docstring for the output size)."""
    if ceil_mode:
        return F.avg_pool2d(x, stride, stride, ceil_mode=True)
    if (torch.jit.is_tracing() or torch.jit.is_scripting() or stride != 2 or x.dim() != 4
            or x.shape[-2] % 2 or x.shape[-1] % 2 or x.device.type != 'cpu' or not x.is_contiguous()):
        return F.avg_pool2d(x, _window(x, stride), [stride, stride])
    B, C, H, W = x.shape
    rows = x.view(B, C, H // 2, 2 * W)
    rows = rows[..., :W] + rows[..., W:]
    cols = rows.view(B, C, H // 2, W // 2, 2)
    return (cols[..., 0] + cols[..., 1]).mul_(0.25)


def window_max_pool2d(x: torch.Tensor, stride: int, ceil_mode: bool = False) -> torch.Tensor:
    """Max over ``stride x stride`` windows (see the module docstring for the output size)."""
    if ceil_mode:
        return F.max_pool2d(x, stride, stride, ceil_mode=True)
    return F.max_pool2d(x, _window(x, stride), [stride, stride])


@register_notrace_module
class WindowAvgPool2d(PoolLayer):
    """Average pooling with kernel = stride (``avgp``)."""

    def __init__(self, stride: int = 2, ceil_mode: bool = False):
        super().__init__()
        self.stride = stride
        self.ceil_mode = ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_avg_pool2d(x, self.stride, self.ceil_mode)

    def export_form(self, in_size: Tuple[int, int], chunk: Optional[int] = None) -> nn.Module:
        if self.ceil_mode:
            raise ExportError('its ceil-mode windows have no TFLite pooling')
        return _WindowAvgExport(self.stride)

    def extra_repr(self) -> str:
        return f'stride={self.stride}, ceil_mode={self.ceil_mode}'


class _WindowAvgExport(PoolLayer):
    """The export form of ``WindowAvgPool2d``: one AVERAGE_POOL_2D."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride, self.ceil_mode = stride, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_avg(x, self.stride)


@register_notrace_module
class WindowMaxPool2d(PoolLayer):
    """Max pooling with kernel = stride (``maxp``, and the paper's ResNet stem pool at stride 2)."""

    def __init__(self, stride: int = 2, ceil_mode: bool = False):
        super().__init__()
        self.stride = stride
        self.ceil_mode = ceil_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_max_pool2d(x, self.stride, self.ceil_mode)

    def extra_repr(self) -> str:
        return f'stride={self.stride}, ceil_mode={self.ceil_mode}'
