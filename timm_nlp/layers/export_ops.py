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
- a computation the converter decomposes into ops TFLite Micro cannot run int8, or not exactly, where one TFLite op
  computes it: an ``ExportedOps`` module (``L2Normalize``, fused after conversion), which tells the memory count the
  ops it becomes (as ``WindowsLast`` does for its layout copies).
"""
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ['ExportedOps', 'TwoSchedules', 'L2Normalize', 'WindowsLast', 'exp_int8', 'nearest_up', 'tree_cat',
           'explicit_padding', 'window_avg', 'ExportError', 'CONCAT_MAX_INPUTS', 'INT8_SOFTMAX_MAX_ROW']

CONCAT_MAX_INPUTS = 10
# the longest softmax row whose exponentials (each at most 1) always sum below 512, as TFLite Micro's int8 SOFTMAX
# with an int8 output needs: longer rows take its int16 output
INT8_SOFTMAX_MAX_ROW = 511


class ExportError(ValueError):
    """A layer that has no exact export form (raised before any conversion, with the reason)."""


class ExportedOps(nn.Module):
    """A computation that the exported model holds as the TFLite ops ``OPS``, one after another, each writing a buffer
    the size of the module's output, whatever the ops it is traced as (the memory count asks it, ``tflm_profile``)."""

    OPS: Tuple[str, ...] = ()


class TwoSchedules(nn.Module):
    """An export form with two exact schedules: ``lean`` holds less at a time and runs more ops (each op adds to the
    runtime's arena tail), otherwise fewer ops. ``timm_nlp.export_model.export_form_model`` keeps it lean only where
    that lowers the model's counted peak."""

    lean: bool = True


class L2Normalize(ExportedOps):
    """``x / ||x||`` over the last axis (0 where ``x`` is 0), one int8 L2_NORMALIZATION once exported: the converter
    decomposes it into MUL, SUM, MAXIMUM, RSQRT and MUL, which ``timm_nlp.deploy.flatbuffer.fuse_l2_normalization``
    fuses, and the quantiser gives its output that kernel's fixed quantisation, ``OUTPUT_QPARAMS`` (scale, zero
    point). An int8 RSQRT could not take its place: its range reaches ``1 / sqrt(eps)`` where ``x`` is near 0."""

    OPS = ('L2_NORMALIZATION',)
    OUTPUT_QPARAMS = (1 / 128, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.clamp_min((x * x).sum(-1, keepdim=True), 1e-30))


class WindowsLast(ExportedOps):
    """The ``kh x kw`` windows that tile a map ``(1, C, Ho * kh, Wo * kw)``, each window's elements on the last axis:
    ``(Ho * Wo, C, kh * kw)`` (window by window in row-major order, then channel), as two TRANSPOSEs of the NHWC map."""

    OPS = ('TRANSPOSE', 'TRANSPOSE')

    def forward(self, x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        C, Ho, Wo = x.shape[1], x.shape[2] // kh, x.shape[3] // kw
        rows = x.permute(0, 2, 3, 1).reshape(Ho, kh, Wo, kw * C).transpose(1, 2)
        return rows.reshape(Ho * Wo, kh * kw, C).transpose(1, 2)


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
