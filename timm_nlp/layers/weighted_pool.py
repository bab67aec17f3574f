"""Weighted pooling: the core shared by lip, nlp, dfmnlp, mixp and dfmixp.

An importance map ``w = exp(logit(x))`` with ``logit`` in (0, 1) weights every activation before an
``s x s`` average pool: ``y = avgpool(x * w) / avgpool(w)`` (window normalisation, a soft-max over each
window) or ``y = avgpool(x * w)`` (``nowin``). Windows use ceil mode, so the output is
``ceil(H / s) x ceil(W / s)`` for every input size.
"""
from typing import Any, Dict, Optional, Type

import torch
from torch import nn

from timm.layers import register_notrace_module

from .self_attn_pool import SelfAttentiveImportance, upsample_patches
from .window_pool import window_avg_pool2d

__all__ = ['scale_by_patches', 'weighted_pool2d', 'LocalImportance', 'WeightedPool2d']


def scale_by_patches(y: torch.Tensor, w: torch.Tensor, factor: int) -> torch.Tensor:
    """``y * w'``, with ``w'`` the nearest up-sampling of ``w`` by ``factor`` cropped to ``y``'s size; where no crop
    is needed, a broadcast product over (patch, position-in-patch) views that never forms ``w'``."""
    B, C, H, W = y.shape
    Hp, Wp = w.shape[-2], w.shape[-1]
    if factor == 1 or H != Hp * factor or W != Wp * factor:
        return y * upsample_patches(w, (H, W), factor)
    out = y.view(B, C, Hp, factor, Wp, factor) * w.view(B, C, Hp, 1, Wp, 1)
    return out.reshape(B, C, H, W)


def weighted_pool2d(x: torch.Tensor, weight: torch.Tensor, stride: int, win_norm: bool = True) -> torch.Tensor:
    """Pool ``x`` over ``stride x stride`` windows with positive weights of the same shape."""
    num = window_avg_pool2d(x * weight, stride)
    if not win_norm:
        return num
    return num / window_avg_pool2d(weight, stride)


class LocalImportance(nn.Module):
    """Local importance logit of LIP (Gao et al., ICCV 2019): ``sigmoid(BN(conv1x1(x)))``."""

    def __init__(
            self,
            channels: int,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(channels, channels, 1, bias=False, **dd)
        self.norm = norm_layer(channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).sigmoid()


@register_notrace_module
class WeightedPool2d(nn.Module):
    """Importance-weighted pooling with a local (lip), non-local (nlp) or mixed (product) logit.

    Args:
        channels: Channels of the pooled map.
        stride: Pooling window and stride.
        local: Use the local (LIP) importance.
        non_local: Keyword arguments of ``SelfAttentiveImportance``, or None for no non-local importance.
        win_norm: Normalise by the window's total weight (False for the ``nowin`` modifier).
    """

    def __init__(
            self,
            channels: int,
            stride: int = 2,
            local: bool = False,
            non_local: Optional[Dict[str, Any]] = None,
            win_norm: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not local and non_local is None:
            raise ValueError('WeightedPool2d needs an importance: local=True and/or non_local={...}.')
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.stride = stride
        self.win_norm = win_norm
        self.lip = LocalImportance(channels, **dd) if local else None
        self.nlp = SelfAttentiveImportance(channels, **non_local, **dd) if non_local is not None else None
        # the weight is constant inside every window (a non-local-only, un-normalised pool whose patch size is a
        # multiple of the stride), so avgpool(x * w) = avgpool(x) * w at the windows
        self.weights_after_pooling = self.lip is None and self.nlp is not None and not win_norm and \
            self.nlp.patch_size % stride == 0

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """Importance logit in (0, 1), same shape as ``x``."""
        if self.lip is not None and self.nlp is not None:
            return self.lip(x) * self.nlp(x)
        if self.lip is not None:
            return self.lip(x)
        assert self.nlp is not None
        return self.nlp(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                'WeightedPool2d expects input (B, {}, H, W), got shape {}'.format(self.channels, list(x.shape)))
        s = self.stride
        if self.weights_after_pooling and self.nlp is not None:
            # no full-resolution weight map is formed; in eval not even an output-sized one
            pooled = window_avg_pool2d(x, s)
            if self.training:
                return pooled * self.nlp(x, s).exp()
            return scale_by_patches(pooled, self.nlp.token_logit(x).exp(), self.nlp.patch_size // s)
        return weighted_pool2d(x, self.logit(x).exp(), s, self.win_norm)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, stride={self.stride}, win_norm={self.win_norm}'
