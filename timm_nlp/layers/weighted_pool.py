"""Weighted pooling: the core shared by lip, nlp, dfmnlp, mixp and dfmixp.

An importance map ``w > 0`` weights every activation before an ``s x s`` average pool:
``y = avgpool(x * w) / avgpool(w)`` (window normalisation) or ``y = avgpool(x * w)`` (``nowin``).
"""
from typing import Any, Dict, Final, Optional

import torch
from torch import nn

from timm.layers import register_notrace_module

from .self_attn_pool import ConvLayer, SelfAttentiveImportance, upsample_nearest
from .window_pool import window_avg_pool2d

__all__ = ['weighted_pool2d', 'LocalImportance', 'WeightedPool2d']


def weighted_pool2d(x: torch.Tensor, weight: torch.Tensor, stride: int, win_norm: bool = True,
                    ceil_mode: bool = False) -> torch.Tensor:
    """Pool ``x`` over ``stride x stride`` windows with positive weights of the same shape."""
    num = window_avg_pool2d(x * weight, stride, ceil_mode)
    if not win_norm:
        return num
    return num / window_avg_pool2d(weight, stride, ceil_mode)


class LocalImportance(nn.Module):
    """Local importance ``exp(sigmoid(BN(conv(x))))``: LIP's (Gao et al., ICCV 2019; a 1x1 conv) and mixp's (a
    k x k conv, 'same' padding). The conv has a bias, as in the paper's code."""

    def __init__(
            self,
            channels: int,
            kernel_size: int = 1,
            conv_layer: ConvLayer = nn.Conv2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        # 'same' as torch pads it (the odd pixel of an even kernel after); a dynamic conv's attention reads x itself
        self.conv = conv_layer(channels, channels, kernel_size, stride=1, padding='same', bias=True, **dd)
        self.norm = nn.BatchNorm2d(channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).sigmoid().exp()


@register_notrace_module
class WeightedPool2d(nn.Module):
    """Importance-weighted pooling with a local (lip), non-local (nlp, dfmnlp) or mixed (product) importance.

    Args:
        channels: Channels of the pooled map.
        stride: Pooling window and stride.
        local_kernel: Kernel of the local importance conv (1 for lip, the patch size for mixp), None for none.
        non_local: Keyword arguments of ``SelfAttentiveImportance``, or None for no non-local importance.
        win_norm: Normalise by the window's total weight (False for the ``nowin`` modifier; lip always normalises).
        ceil_mode: Ceil-mode windows (the in-block placement); the paper's placements use floor mode.
        conv_layer: The convolution of the non-local branch and of the local branch (mixp).
    """
    patch_size: Final[int]
    patches_of_windows: Final[bool]

    def __init__(
            self,
            channels: int,
            stride: int = 2,
            local_kernel: Optional[int] = None,
            non_local: Optional[Dict[str, Any]] = None,
            win_norm: bool = True,
            ceil_mode: bool = False,
            conv_layer: ConvLayer = nn.Conv2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if local_kernel is None and non_local is None:
            raise ValueError('WeightedPool2d needs an importance: local_kernel=k and/or non_local={...}.')
        dd = {'device': device, 'dtype': dtype}
        self.channels = channels
        self.stride = stride
        self.win_norm = win_norm
        self.ceil_mode = ceil_mode
        self.local = LocalImportance(channels, local_kernel, conv_layer, **dd) if local_kernel is not None else None
        self.nlp = SelfAttentiveImportance(channels, conv_layer=conv_layer, **non_local, **dd) \
            if non_local is not None else None
        # constants of the module (TorchScript prunes the branches they disable)
        self.patch_size = self.nlp.patch_size if self.nlp is not None else 1
        self.patches_of_windows = self.local is None and self.nlp is not None and not self.nlp.deformable and \
            self.patch_size > 1 and self.patch_size % stride == 0

    def window_constant(self, x: torch.Tensor) -> bool:
        """Whether the importance is constant inside every window: a non-local-only, regular-embedding pool whose
        patches tile the map and are a multiple of the stride. Then ``avgpool(x * w) = avgpool(x) * w`` at the
        windows, and window normalisation cancels the weights (such a pool is an average pool)."""
        p = self.patch_size
        return self.patches_of_windows and x.shape[-2] % p == 0 and x.shape[-1] % p == 0

    def importance(self, x: torch.Tensor) -> torch.Tensor:
        """The importance map of ``x``, same shape."""
        w: Optional[torch.Tensor] = None
        if self.nlp is not None:
            w = self.nlp(x)
        if self.local is not None:
            local = self.local(x)
            w = local if w is None else local * w
        assert w is not None
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                'WeightedPool2d expects input (B, {}, H, W), got shape {}'.format(self.channels, list(x.shape)))
        s = self.stride
        if self.patches_of_windows and self.window_constant(x):
            pooled = window_avg_pool2d(x, s, self.ceil_mode)
            if self.win_norm and not self.training:
                return pooled  # the weights cancel (training still runs them, for the BN statistics)
            w, _ = self.nlp.token_weights(x)
            w = upsample_nearest(w, (pooled.shape[-2], pooled.shape[-1]))
            return pooled * w / w if self.win_norm else pooled * w
        return weighted_pool2d(x, self.importance(x), s, self.win_norm, self.ceil_mode)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, stride={self.stride}, win_norm={self.win_norm}, ceil_mode={self.ceil_mode}'
