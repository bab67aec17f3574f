"""Formulations that TensorFlow Lite Micro can run, for the layers' export forms (``PoolLayer.export_form``).

An export form computes its layer's eval output for one input size, batch 1, with only ops that TFLite Micro has, in
int8 wherever it has an int8 kernel:

- no runtime index arithmetic: nearest up-sampling by an integer factor is ``F.interpolate`` (RESIZE_NEAREST_NEIGHBOR),
  any other factor a gather with a constant index table; position embeddings are constants;
- ``exp(s) = sigmoid(s) / sigmoid(-s)`` (LOGISTIC and DIV are int8; TFLite Micro's EXP is float only);
- explicit integer padding (no ``padding='same'``);
- concatenations of at most ten inputs (TFLite Micro's CONCATENATION limit);
- softmax rows of any length: TFLite Micro's int8 SOFTMAX aborts where a row's exponentials sum to 512 or more
  (its int8 output path), so rows longer than ``INT8_SOFTMAX_MAX_ROW`` are deployed with an int16 output requantised
  to int8 (``timm_nlp.deploy``);
- what must stay float (TFLite Micro has no int8 kernel: EXP, LOG, SQRT) inside a ``FloatIsland``, which the int8
  quantiser leaves unquantised.
"""
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ['FloatIsland', 'exp_int8', 'nearest_up', 'tree_cat', 'explicit_padding', 'window_avg', 'ExportError',
           'CONCAT_MAX_INPUTS', 'INT8_SOFTMAX_MAX_ROW']

CONCAT_MAX_INPUTS = 10
# the longest softmax row whose exponentials (each at most 1) always sum below 512, as TFLite Micro's int8 SOFTMAX
# with an int8 output needs: longer rows take its int16 output
INT8_SOFTMAX_MAX_ROW = 511


class ExportError(ValueError):
    """A layer that has no exact export form (raised before any conversion, with the reason)."""


class FloatIsland(nn.Module):
    """Ops that stay float in the deployed model (TFLite Micro has no int8 kernel for them): the int8 quantiser leaves
    every op traced under a ``FloatIsland`` unannotated, so the graph dequantises into it and quantises out of it.

    Args:
        fn: The float computation.
        name: What it computes, for the export report (e.g. 'sqrt').
    """

    def __init__(self, fn: Callable[..., torch.Tensor], name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)

    def extra_repr(self) -> str:
        return self.name


def exp_int8(s: torch.Tensor) -> torch.Tensor:
    """``exp(s)`` as ``sigmoid(s) / sigmoid(-s)``, which is exact (two LOGISTIC and a DIV, all int8 in TFLite Micro)."""
    return torch.sigmoid(s) / torch.sigmoid(-s)


def window_avg(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The floor-mode window mean of ``timm_nlp.layers.window_avg_pool2d`` as one AVERAGE_POOL_2D."""
    H, W = x.shape[-2], x.shape[-1]
    return F.avg_pool2d(x, [stride if H >= stride else H, stride if W >= stride else W], [stride, stride])


def nearest_up(t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest up-sampling of ``t`` (B, C, h, w) to ``size`` with the package's index map ``(i * h) // H``
    (``upsample_nearest``): RESIZE_NEAREST_NEIGHBOR for integer factors, else a gather with constant indices."""
    h, w = t.shape[-2], t.shape[-1]
    H, W = size
    if (H, W) == (h, w):
        return t
    if H % h == 0 and W % w == 0:
        return F.interpolate(t, scale_factor=(H // h, W // w), mode='nearest')
    rows = torch.tensor([i * h // H for i in range(H)], dtype=torch.int32)
    cols = torch.tensor([j * w // W for j in range(W)], dtype=torch.int32)
    return t.index_select(2, rows).index_select(3, cols)


def tree_cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(parts, dim)`` as a tree of concatenations of at most ``CONCAT_MAX_INPUTS`` inputs."""
    parts = list(parts)
    while len(parts) > 1:
        parts = [torch.cat(parts[i:i + CONCAT_MAX_INPUTS], dim) if len(parts[i:i + CONCAT_MAX_INPUTS]) > 1
                 else parts[i] for i in range(0, len(parts), CONCAT_MAX_INPUTS)]
    return parts[0]


class _Pad(nn.Module):
    def __init__(self, pads: List[int]):
        super().__init__()
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads)


def explicit_padding(conv: nn.Conv2d) -> nn.Module:
    """``conv`` itself, or where it pads 'same', the same convolution with integer padding (an explicit ``F.pad``
    before it for the odd pixel of an even kernel, which torch pads after). Shares the weights."""
    if conv.padding != 'same':
        return conv
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation, conv.groups,
                    conv.bias is not None, device='meta')
    new.weight, new.bias = conv.weight, conv.bias
    pads: List[int] = []
    for k, d in zip(conv.kernel_size[::-1], conv.dilation[::-1]):  # W then H, as F.pad takes them
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    if pads[0] == pads[1] and pads[2] == pads[3]:
        new.padding = (pads[2], pads[0])
        return new
    return nn.Sequential(_Pad(pads), new)
