"""Gaussian-based pooling (Kobayashi, NeurIPS 2019), as the Self-Attentive Pooling paper's code builds it."""
import math
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from timm.layers import register_notrace_module

from .export_ops import ExportError, L2Normalize, WindowsLast, nearest_up, window_avg
from .protocol import PatchSupport, PoolLayer
from .window_pool import window_avg_pool2d

__all__ = ['GaussianPool2d']


def _window_variance(x: torch.Tensor, mean: torch.Tensor, s: int, ceil_mode: bool) -> torch.Tensor:
    """Two-pass variance of every ``s x s`` window, ``mean((x - window mean)^2)``: over the ``s^2`` strided views
    of the window positions where whole windows tile the map, else through the nearest up-sampled mean."""
    H, W = x.shape[-2], x.shape[-1]
    Ho, Wo = mean.shape[-2], mean.shape[-1]
    if ceil_mode or H < s or W < s:
        h, w = min(H, Ho * s), min(W, Wo * s)
        dev = x[..., :h, :w] - mean.repeat_interleave(s, -2)[..., :h, :].repeat_interleave(s, -1)[..., :w]
        return window_avg_pool2d(dev * dev, s, ceil_mode)
    views: List[torch.Tensor] = []
    for i in range(s):
        for j in range(s):
            views.append(x[..., i:Ho * s:s, j:Wo * s:s])
    return torch.stack(views).sub(mean).square().mean(0)


@register_notrace_module
class GaussianPool2d(PoolLayer):
    """``y = mean + W * std`` of each ``s x s`` window.

    ``W = softplus(MU)`` in eval (deterministic) and ``softplus(MU + SIGMA * eps)`` in training, ``eps ~ N(0, 1)`` per
    output element, where ``MU = BN(conv(Z))``, ``SIGMA = sigmoid(BN(conv(Z)))`` and ``Z = ReLU(BN(conv(GAP(x))))``
    (C -> C/2 -> C, 1x1 convs with bias). ``std = sqrt(max(var, eps))``; the window moments are computed in at least
    fp32, the variance in two passes (``E[x^2] - E[x]^2`` cancels away most of a small window variance).

    Patch by patch it runs in two passes: the global average of its input summed region by region, then its global
    branch once, then the windows of every patch with that branch's ``softplus(MU)``.
    """

    def __init__(self, channels: int, stride: int = 2, eps: float = 1e-6, ceil_mode: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        hidden = channels // 2
        if hidden < 1:
            raise ValueError(f'GaussianPool2d needs at least 2 channels (a hidden layer of channels // 2), '
                             f'got {channels}.')
        self.channels = channels
        self.stride = stride
        self.eps = eps
        self.ceil_mode = ceil_mode
        self.hidden = nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(channels, hidden, 1, **dd)), ('bn', nn.BatchNorm2d(hidden, **dd)), ('act', nn.ReLU())]))
        self.mu = nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(hidden, channels, 1, **dd)), ('bn', nn.BatchNorm2d(channels, **dd))]))
        self.sigma = nn.Sequential(OrderedDict([
            ('conv', nn.Conv2d(hidden, channels, 1, **dd)), ('bn', nn.BatchNorm2d(channels, **dd))]))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                'GaussianPool2d expects input (B, {}, H, W), got shape {}'.format(self.channels, list(x.shape)))

    def _moments(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mean and the standard deviation of every window of ``x``, in at least fp32."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = window_avg_pool2d(xf, self.stride, self.ceil_mode)
        return mean, _window_variance(xf, mean, self.stride, self.ceil_mode).clamp(min=self.eps).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        mean, std = self._moments(x)
        z = self.hidden(x.mean((2, 3), keepdim=True))
        eta = self.mu(z)
        if self.training:
            eta = eta + self.sigma(z).sigmoid() * torch.randn_like(mean)
        return (mean + F.softplus(eta) * std).to(x.dtype)

    def patch_support(self) -> PatchSupport:
        if self.ceil_mode:
            return PatchSupport.whole_map('its ceil-mode windows are not run patch by patch')
        return PatchSupport.two_pass('gaussian')

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel sum of a region (at least fp32)."""
        return x.to(torch.promote_types(x.dtype, torch.float32)).sum((2, 3), keepdim=True)

    def global_state(self, parts: List[Tuple[Tuple[int, int], torch.Tensor]], in_size: Tuple[int, int]
                     ) -> torch.Tensor:
        """``softplus(MU)`` of the global average (the regions partition the input)."""
        mean = torch.stack([part for _, part in parts]).sum(0) / (in_size[0] * in_size[1])
        return F.softplus(self.mu(self.hidden(mean.to(self.mu.conv.weight.dtype))))

    def pool_patch(self, x: torch.Tensor, state: torch.Tensor, origin: Tuple[int, int]) -> torch.Tensor:
        mean, std = self._moments(x)
        return (mean + state * std).to(x.dtype)

    def two_pass_numel(self, in_size: Tuple[int, int]) -> Tuple[int, int]:
        return self.channels, self.channels

    def export_form(self, in_size: Tuple[int, int], chunk: Optional[int] = None) -> nn.Module:
        if self.ceil_mode:
            raise ExportError('its ceil-mode windows have no TFLite pooling')
        return _GaussianPoolExport(self, in_size)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, stride={self.stride}'


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) = log(1 + e^x) = -log(softmax([x, 0]))[1]``, which is exact: one int8 LOG_SOFTMAX once exported
    (TFLite Micro's LOG and EXP are float only, F.softplus becomes a SELECT, which it lacks)."""
    return -torch.log(torch.softmax(F.pad(x.unsqueeze(-1), (0, 1)), -1))[..., 1]


class _GaussianPoolExport(PoolLayer):
    """The export form of ``GaussianPool2d`` (eval, batch 1), int8 throughout: the window means as AVERAGE_POOL_2D;
    the standard deviation of a window ``w`` of ``k`` deviations from its mean as ``||w|| / sqrt(k) = mean(w *
    w / ||w||) * sqrt(k)``, with ``w / ||w||`` one L2_NORMALIZATION over the window's elements (TFLite Micro's SQRT is
    float only, and an int8 RSQRT's range would reach ``1 / sqrt(eps)`` in flat windows); ``sqrt(max(var, eps)) =
    max(std, sqrt(eps))``; the global branch's softplus as a LOG_SOFTMAX."""

    def __init__(self, pool: GaussianPool2d, in_size: Tuple[int, int]):
        super().__init__()
        self.stride, self.ceil_mode, self.eps, self.channels = pool.stride, False, pool.eps, pool.channels
        self.area = in_size[0] * in_size[1]
        self.hidden, self.mu = pool.hidden, pool.mu
        self.windows, self.normalize = WindowsLast(), L2Normalize()

    def _windows(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        mean = window_avg(x, self.stride)
        C, Ho, Wo = mean.shape[1:]
        # the window's rows and columns (the whole axis where it is shorter than a window)
        kh, kw = min(self.stride, x.shape[-2]), min(self.stride, x.shape[-1])
        if kh * kw == 1:  # windows of one pixel: no deviation, std = sqrt(eps)
            return mean + scale * math.sqrt(self.eps)
        dev = x[:, :, :Ho * kh, :Wo * kw] - nearest_up(mean, (Ho * kh, Wo * kw))
        windows = self.windows(dev, kh, kw)
        std = (windows * self.normalize(windows)).mean(-1) * math.sqrt(kh * kw)
        std = torch.clamp_min(std, math.sqrt(self.eps)).reshape(1, Ho, Wo, C)
        return (mean.permute(0, 2, 3, 1) + scale.permute(0, 2, 3, 1) * std).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._windows(x, _softplus(self.mu(self.hidden(x.mean((2, 3), keepdim=True)))))

    def patch_support(self) -> PatchSupport:
        return PatchSupport.two_pass('gaussian')

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        """The region's share of the global mean, ``mean(region) * area(region) / area(map)`` (a mean, not a sum:
        int8 keeps its precision)."""
        return x.mean((2, 3), keepdim=True) * (x.shape[-2] * x.shape[-1] / self.area)

    def global_state(self, parts: List[Tuple[Tuple[int, int], torch.Tensor]], in_size: Tuple[int, int]
                     ) -> torch.Tensor:
        mean = parts[0][1]
        for _, part in parts[1:]:
            mean = mean + part
        return _softplus(self.mu(self.hidden(mean)))

    def pool_patch(self, x: torch.Tensor, state: torch.Tensor, origin: Tuple[int, int]) -> torch.Tensor:
        return self._windows(x, state)

    def two_pass_numel(self, in_size: Tuple[int, int]) -> Tuple[int, int]:
        return self.channels, self.channels
