"""Gaussian-based pooling (Kobayashi, NeurIPS 2019)."""
from typing import List

import torch
from torch import nn
from torch.nn import functional as F

from timm.layers import register_notrace_module

from .self_attn_pool import upsample_patches
from .window_pool import window_avg_pool2d

__all__ = ['GaussianPool2d']


def _window_variance(x: torch.Tensor, mean: torch.Tensor, s: int) -> torch.Tensor:
    """Two-pass variance of every ``s x s`` window, ``mean((x - window mean)^2)``: over the ``s^2`` strided views
    of the window positions where the windows tile ``x``, else through the nearest up-sampled mean (ceil mode)."""
    H, W = x.shape[-2], x.shape[-1]
    if H % s or W % s:
        dev = x - upsample_patches(mean, (H, W), s)
        return window_avg_pool2d(dev * dev, s)
    views: List[torch.Tensor] = []
    for i in range(s):
        for j in range(s):
            views.append(x[..., i::s, j::s])
    return torch.stack(views).sub(mean).square().mean(0)


@register_notrace_module
class GaussianPool2d(nn.Module):
    """``y = mean + softplus(eta) * std`` of each ``s x s`` window.

    ``eta`` is an input-dependent, per-channel Gaussian variable: its mean ``mu`` and deviation ``sigma``
    come from the globally averaged input; training samples ``eta = mu + sigma * noise`` per output
    element, eval uses ``eta = mu`` (deterministic). The window moments are computed in at least fp32, the
    variance in two passes: ``E[x^2] - E[x]^2`` cancels away most of a small window variance.
    """

    def __init__(self, channels: int, stride: int = 2, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.stride = stride
        self.eps = eps
        self.mu = nn.Conv2d(channels, channels, 1, **dd)
        self.sigma = nn.Conv2d(channels, channels, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                'GaussianPool2d expects input (B, {}, H, W), got shape {}'.format(self.channels, list(x.shape)))
        s = self.stride
        # two-pass window variance, mean((x - mean)^2): exact 0 on constant windows (ceil mode's 1-element edge
        # windows among them), where sqrt(var + eps) would amplify E[x^2] - E[x]^2's rounding 1 / (2 sqrt(eps))-fold
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = window_avg_pool2d(xf, s)
        std = (_window_variance(xf, mean, s) + self.eps).sqrt()
        g = x.mean((2, 3), keepdim=True)
        eta = self.mu(g)
        if self.training:
            eta = eta + F.softplus(self.sigma(g)) * torch.randn_like(mean)
        return (mean + F.softplus(eta) * std).to(x.dtype)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, stride={self.stride}'
