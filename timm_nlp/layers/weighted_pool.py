"""Weighted pooling: the core shared by lip, nlp, dfmnlp, mixp and dfmixp.

An importance map ``w > 0`` weights every activation before an ``s x s`` average pool:
``y = avgpool(x * w) / avgpool(w)`` (window normalisation) or ``y = avgpool(x * w)`` (``nowin``).
"""
import re
from typing import Any, Dict, Final, List, Optional, Tuple

import torch
from torch import nn

from timm.layers import register_notrace_module

from .export_ops import ExportError, exp_int8, explicit_padding, nearest_up, tree_cat, window_avg
from .protocol import PatchSupport, PoolLayer
from .self_attn_pool import ConvLayer, SelfAttentiveImportance, upsample_nearest
from .window_pool import window_avg_pool2d

__all__ = ['weighted_pool2d', 'LocalImportance', 'WeightedPool2d', 'rename_legacy_keys']

# the non-local importance was the child ``nlp`` before it was named for what it is
_LEGACY_KEY = re.compile(r'(^|\.)nlp\.')


def rename_legacy_keys(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``state_dict`` with the keys of a weighted pool's non-local importance as written by earlier versions
    (``...pool.nlp.*``) renamed to today's (``...pool.non_local.*``)."""
    return {_LEGACY_KEY.sub(r'\1non_local.', k): v for k, v in state_dict.items()}


def _load_legacy_keys(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + 'nlp.')]:
        state_dict[prefix + 'non_local.' + key[len(prefix) + 4:]] = state_dict.pop(key)


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
class WeightedPool2d(PoolLayer):
    """Importance-weighted pooling with a local (lip), non-local (nlp, dfmnlp) or mixed (product) importance.

    Patch by patch (``PoolLayer``): a local-only pool (lip) runs locally; a non-local pool of tokens larger than a pixel
    in two passes (the tokens embedded region by region, attention once over the whole token grid, then the pooling
    of every patch with its token weights); mixp, deformable, dynamic, ceil-mode and p = 1 pools need the whole map.

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
        self.non_local = SelfAttentiveImportance(channels, conv_layer=conv_layer, **non_local, **dd) \
            if non_local is not None else None
        # constants of the module (TorchScript prunes the branches they disable)
        self.patch_size = self.non_local.patch_size if self.non_local is not None else 1
        self.patches_of_windows = self.local is None and self.non_local is not None and \
            not self.non_local.deformable and self.patch_size > 1 and self.patch_size % stride == 0
        self.held_outputs = ('non_local',) if self.local is not None and self.non_local is not None else ()
        self.register_load_state_dict_pre_hook(_load_legacy_keys)

    def window_constant(self, x: torch.Tensor) -> bool:
        """Whether the importance is constant inside every window: a non-local-only, regular-embedding pool whose
        patches tile the map and are a multiple of the stride. Then ``avgpool(x * w) = avgpool(x) * w`` at the
        windows, and window normalisation cancels the weights (such a pool is an average pool)."""
        p = self.patch_size
        return self.patches_of_windows and x.shape[-2] % p == 0 and x.shape[-1] % p == 0

    def importance(self, x: torch.Tensor) -> torch.Tensor:
        """The importance map of ``x``, same shape."""
        w: Optional[torch.Tensor] = None
        if self.non_local is not None:
            w = self.non_local(x)
        if self.local is not None:
            local = self.local(x)
            w = local if w is None else local * w
        assert w is not None
        return w

    def _pool_token_weights(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The pooling of ``x`` with the weights ``w`` of its tokens (``(B, C, H / p, W / p)``)."""
        if self.window_constant(x):
            pooled = window_avg_pool2d(x, self.stride, self.ceil_mode)
            if self.win_norm and not self.training:
                return pooled
            w = upsample_nearest(w, (pooled.shape[-2], pooled.shape[-1]))
            # window normalisation cancels the weights; in training they still run, so that the importance branch
            # updates its BN statistics and gets its (zero) gradients as in the paper's code, where they never cancel
            return pooled * w / w if self.win_norm else pooled * w
        return weighted_pool2d(x, upsample_nearest(w, (x.shape[-2], x.shape[-1])), self.stride, self.win_norm,
                               self.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                'WeightedPool2d expects input (B, {}, H, W), got shape {}'.format(self.channels, list(x.shape)))
        if self.patches_of_windows and self.window_constant(x):
            if self.win_norm and not self.training:
                return window_avg_pool2d(x, self.stride, self.ceil_mode)  # the weights cancel
            assert self.non_local is not None
            w, _ = self.non_local.token_weights(x)
            return self._pool_token_weights(x, w)
        return weighted_pool2d(x, self.importance(x), self.stride, self.win_norm, self.ceil_mode)

    def operand_numel(self, x: torch.Tensor, out: torch.Tensor) -> int:
        """The importance map (input-sized); where it is constant per window, the token weights and their
        up-sampling to the windows, or nothing for a window-normalised pool in eval (an average pool)."""
        if not self.window_constant(x):
            return x.numel()
        if self.win_norm:
            return 0
        B, C, H, W = x.shape
        p = self.patch_size
        return B * C * (H // p) * (W // p) + out.numel()

    def held_numel(self, x: torch.Tensor) -> int:
        """The pooled map of an unnormalised pool whose weights are constant per window, computed first."""
        if not self.window_constant(x) or self.win_norm:
            return 0
        B, C, H, W = x.shape
        return B * C * (H // self.stride) * (W // self.stride)

    def patch_support(self) -> PatchSupport:
        nl = self.non_local
        if nl is None:
            return PatchSupport.local()
        if self.local is not None:
            return PatchSupport.whole_map("mixp's local term is not run patch by patch")
        if nl.deformable:
            return PatchSupport.whole_map('its deformable embedding samples at unbounded offsets')
        if nl.patch_size == 1:
            return PatchSupport.whole_map('its attention mixes the tokens of the full-resolution map (p = 1)')
        if nl.dynamic:
            return PatchSupport.whole_map('its dynamic restore conv is routed by the mean of the whole map')
        if self.ceil_mode:
            return PatchSupport.whole_map('its ceil-mode windows are not run patch by patch')
        return PatchSupport.two_pass('nlp', nl.patch_size)

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        """The embedded tokens ``(B, E, H / p, W / p)`` of a region of whole tokens."""
        assert self.non_local is not None
        return self.non_local.embed(x)[0]

    def global_state(self, parts: List[Tuple[Tuple[int, int], torch.Tensor]], in_size: Tuple[int, int]
                     ) -> torch.Tensor:
        """The weights of every token of the input, from its embedded tokens (the parts tile the token grid)."""
        assert self.non_local is not None
        return self.non_local.weights_of_tokens(_assemble(parts), in_size)

    def pool_patch(self, x: torch.Tensor, state: torch.Tensor, origin: Tuple[int, int]) -> torch.Tensor:
        p = self.patch_size
        r, c = origin[0] // p, origin[1] // p
        return self._pool_token_weights(x, state[:, :, r:r + x.shape[-2] // p, c:c + x.shape[-1] // p])

    def two_pass_numel(self, in_size: Tuple[int, int]) -> Tuple[int, int]:
        assert self.non_local is not None
        tokens = (in_size[0] // self.patch_size) * (in_size[1] // self.patch_size)
        return self.non_local.embed_dim * tokens, self.channels * tokens

    def global_step(self, in_size: Tuple[int, int]) -> Optional[Tuple[nn.Module, Tuple[int, ...]]]:
        assert self.non_local is not None
        p = self.patch_size
        return _TokenWeights(self.non_local, in_size), (self.non_local.embed_dim, in_size[0] // p, in_size[1] // p)

    def export_form(self, in_size: Tuple[int, int], chunk: Optional[int] = None) -> nn.Module:
        if self.ceil_mode:
            raise ExportError('its ceil-mode windows have no TFLite pooling')
        if self.local is not None and not isinstance(self.local.conv, nn.Conv2d):
            raise ExportError('its dynamic local convolution mixes per-sample kernels at run time; TFLite '
                              'convolutions take constant weights')
        return _WeightedPoolExport(self, in_size, chunk)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, stride={self.stride}, win_norm={self.win_norm}, ceil_mode={self.ceil_mode}'


def _assemble(parts: List[Tuple[Tuple[int, int], torch.Tensor]]) -> torch.Tensor:
    """The map tiled by ``parts`` (each with the (row, column) of its origin; row by row, each row left to right),
    by concatenation."""
    rows: Dict[int, List[torch.Tensor]] = {}
    for (r, _), t in parts:
        rows.setdefault(r, []).append(t)
    return tree_cat([tree_cat(row, -1) for _, row in sorted(rows.items())], -2)


class _WeightedPoolExport(PoolLayer):
    """The export form of ``WeightedPool2d`` for an input of ``in_size`` (batch 1, eval): the importance in the ops
    TFLite Micro runs (``exp`` as a ratio of sigmoids, explicit padding, a chunked attention), the window sums as
    AVERAGE_POOL_2D; its two passes too, in the same ops."""

    def __init__(self, pool: WeightedPool2d, in_size: Tuple[int, int], chunk: Optional[int]):
        super().__init__()
        self.stride, self.ceil_mode, self.win_norm = pool.stride, False, pool.win_norm
        self.support, self.patch_size = pool.patch_support(), pool.patch_size
        self.local_conv = explicit_padding(pool.local.conv) if pool.local is not None else None
        self.local_norm = pool.local.norm if pool.local is not None else None
        self.non_local = pool.non_local.export_form(in_size, chunk) if pool.non_local is not None else None
        p = pool.patch_size
        self.constant = pool.patches_of_windows and in_size[0] % p == 0 and in_size[1] % p == 0

    def _pool(self, x: torch.Tensor, token_weights: Optional[torch.Tensor]) -> torch.Tensor:
        s = self.stride
        if self.constant:
            pooled = window_avg(x, s)
            if self.win_norm:
                return pooled  # the weights cancel
            assert token_weights is not None
            return pooled * nearest_up(token_weights, (pooled.shape[-2], pooled.shape[-1]))
        w: Optional[torch.Tensor] = None
        if token_weights is not None:
            w = nearest_up(token_weights, (x.shape[-2], x.shape[-1]))
        if self.local_conv is not None:
            local = exp_int8(torch.sigmoid(self.local_norm(self.local_conv(x))))
            w = local if w is None else local * w
        assert w is not None
        num = window_avg(x * w, s)
        return num / window_avg(w, s) if self.win_norm else num

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        need = self.non_local is not None and not (self.constant and self.win_norm)
        return self._pool(x, self.non_local.token_weights(x) if need else None)

    def patch_support(self) -> PatchSupport:
        return self.support

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        return self.non_local.embed(x)

    def global_state(self, parts: List[Tuple[Tuple[int, int], torch.Tensor]], in_size: Tuple[int, int]
                     ) -> torch.Tensor:
        """The token weights of the whole map; the parts tile the token grid."""
        return self.non_local.weights_of_tokens(_assemble(parts))

    def pool_patch(self, x: torch.Tensor, state: torch.Tensor, origin: Tuple[int, int]) -> torch.Tensor:
        p = self.patch_size
        r, c = origin[0] // p, origin[1] // p
        return self._pool(x, state[:, :, r:r + x.shape[-2] // p, c:c + x.shape[-1] // p])


class _TokenWeights(nn.Module):
    """The attention step of a non-local pool's two passes: token weights from the embedded tokens of a map of
    ``size`` (registered under the pool's child name, so that profiles name its steps as the pool's)."""

    def __init__(self, non_local: SelfAttentiveImportance, size: Tuple[int, int]):
        super().__init__()
        self.non_local, self.size = non_local, size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.non_local.weights_of_tokens(t, self.size)
