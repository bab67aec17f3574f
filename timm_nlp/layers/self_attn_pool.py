"""Non-local importance of Self-Attentive Pooling (Chen et al., WACV 2023, arXiv 2209.07659).

Patch embedding (conv k=p, stride p, or a deformable conv for dfmnlp), a learned 2-D position
embedding resampled to any token grid, multi-head self-attention through
``F.scaled_dot_product_attention`` (timm's ``Attention``: no materialised N x N matrix), then restore:
nearest up-sampling, conv1x1, BN and sigmoid (the conv1x1, and in eval BN and sigmoid too, commute with the
up-sampling and run on the tokens).
"""
import math
from typing import Optional, Tuple, Type

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

from timm.layers import Attention, trunc_normal_

__all__ = ['DeformConv2d', 'SelfAttentiveImportance', 'nlp_embed_dim', 'upsample_patches']


def nlp_embed_dim(channels: int, embed_ratio: float, num_heads: int) -> int:
    """Embedding width ``D = round(ratio * C / heads) * heads``, at least ``heads``."""
    return max(num_heads, int(round(embed_ratio * channels / num_heads)) * num_heads)


def upsample_patches(t: torch.Tensor, size: Tuple[int, int], factor: int) -> torch.Tensor:
    """Nearest up-sampling of a per-patch map by ``factor``, cropped to ``size``.

    ``nearest-exact`` samples at pixel centres, which for an integer factor is the same map as ``nearest``, but
    stays exact where ``nearest``'s ``floor(i * float32(1 / factor))`` picks the previous patch (factor 41, 47, ...).
    Traced (for ONNX, which has no export of it), ``nearest`` is kept: ONNX's ``Resize`` divides by the factor, which
    is exact; a ``torch.jit.trace`` graph keeps ``nearest``'s rounding at such factors (far above the paper's).
    """
    if factor > 1:
        mode = 'nearest' if torch.jit.is_tracing() else 'nearest-exact'
        t = F.interpolate(t, scale_factor=float(factor), mode=mode)
    return t[:, :, :size[0], :size[1]]


class DeformConv2d(nn.Module):
    """Deformable convolution (Dai et al., ICCV 2017) with offsets predicted from its input.

    The offset branch is a plain conv of the same geometry, zero-initialised so the layer starts as a
    regular convolution. The sampling itself is ``torchvision.ops.deform_conv2d``.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            padding: int = 0,
            bias: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(torch.empty(out_chs, in_chs, kernel_size, kernel_size, **dd))
        self.bias = nn.Parameter(torch.empty(out_chs, **dd)) if bias else None
        self.offset = nn.Conv2d(in_chs, 2 * kernel_size * kernel_size, kernel_size, stride, padding, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_offset()

    def reset_offset(self) -> None:
        """Zero the offset branch: the layer is a regular convolution again (a backbone's conv init, which draws
        every ``nn.Conv2d``, calls this after it)."""
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's CPU kernel has no autocast rule: run it in the parameters' dtype, as its CUDA rule does; it has
        # no bf16 kernel (CPU or CUDA) either, so bf16 runs in fp32 and the output is cast back.
        # NaN offsets crash its kernel (segfault), so they become 0; a NaN input still gives a NaN output.
        # Its CUDA backward fails ("internal overlap") on the weight of a 1x1 kernel in channels-last strides, which
        # .contiguous() keeps (size-1 dims): the kernel gets an NCHW-strided copy.
        dtype = self.weight.dtype
        compute = torch.float32 if dtype == torch.bfloat16 else dtype
        offset = torch.nan_to_num(self.offset(x).to(compute))
        bias = self.bias.to(compute) if self.bias is not None else None
        out = deform_conv2d(
            x.to(compute), offset, self.weight.to(compute, copy=True, memory_format=torch.contiguous_format), bias,
            stride=(self.stride, self.stride), padding=(self.padding, self.padding))
        return out.to(dtype)


class SelfAttentiveImportance(nn.Module):
    """Non-local importance logit in (0, 1) for an input of ``channels`` channels.

    Args:
        channels: Input channels C.
        patch_size: Patch (token) size p; maps whose side is not a multiple of p are zero-padded.
        embed_ratio: Embedding width D relative to C (rounded to a multiple of the head count).
        num_heads: Attention heads; default ``max(1, C // 16)``.
        deformable: Use a deformable patch embedding (dfmnlp).
        pos_size: Side of the learned position-embedding grid, bilinearly resampled to the token grid.
    """

    def __init__(
            self,
            channels: int,
            patch_size: int = 1,
            embed_ratio: float = 1.,
            num_heads: Optional[int] = None,
            deformable: bool = False,
            pos_size: int = 14,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if num_heads is None:
            num_heads = max(1, channels // 16)
        if patch_size < 1 or num_heads < 1 or embed_ratio <= 0 or pos_size < 1:
            raise ValueError(f'Invalid self-attentive pooling arguments: patch_size={patch_size}, '
                             f'num_heads={num_heads}, embed_ratio={embed_ratio}, pos_size={pos_size} '
                             f'(patch_size, num_heads and pos_size must be >= 1, embed_ratio > 0).')
        embed_dim = nlp_embed_dim(channels, embed_ratio, num_heads)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        embed_layer = DeformConv2d if deformable else nn.Conv2d
        self.patch_embed = embed_layer(channels, embed_dim, patch_size, stride=patch_size, bias=False, **dd)
        self.norm = norm_layer(embed_dim, **dd)
        self.act = act_layer(inplace=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, pos_size, pos_size, **dd))
        self.attn = Attention(embed_dim, num_heads=num_heads, qkv_bias=True, **dd)
        self.restore = nn.Conv2d(embed_dim, channels, 1, bias=False, **dd)
        self.restore_norm = norm_layer(channels, **dd)
        trunc_normal_(self.pos_embed, std=.02)

    def _pos_embed(self, size: Tuple[int, int]) -> torch.Tensor:
        if size[0] == self.pos_embed.shape[-2] and size[1] == self.pos_embed.shape[-1]:
            return self.pos_embed
        return F.interpolate(self.pos_embed, size=size, mode='bilinear', align_corners=False)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 1-3 (embedding, position, attention): the attended tokens as a (B, D, Hp, Wp) map."""
        B, _, H, W = x.shape
        p = self.patch_size
        pad_h, pad_w = (p - H % p) % p, (p - W % p) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        t = self.act(self.norm(self.patch_embed(x)))
        Hp, Wp = t.shape[-2], t.shape[-1]
        t = t + self._pos_embed((Hp, Wp))
        t = self.attn(t.flatten(2).transpose(1, 2))
        t = t.transpose(1, 2).reshape(B, self.embed_dim, Hp, Wp)
        if x.is_contiguous():
            # the reshape is channels-last strided: the restored map (and its product with x) would be too
            t = t.contiguous()
        return t

    def token_logit(self, x: torch.Tensor) -> torch.Tensor:
        """Eval only: the logit of every patch, (B, C, Hp, Wp); the map is this, nearest up-sampled by p and
        cropped to H x W (conv1x1, BN in eval and sigmoid are pointwise, so they commute with the up-sampling)."""
        return self.restore_norm(self.restore(self._attend(x))).sigmoid()

    def forward(self, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        """The logit map of ``x``; with ``stride`` > 1 (a divisor of the patch size) only its value at every
        ``stride``-th position, i.e. at each pooling window, where it is constant (the map is constant on
        patches): the full-resolution map is never up-sampled in eval."""
        if stride < 1 or self.patch_size % stride:
            raise ValueError(f'stride {stride} must divide the patch size {self.patch_size}: the logit is constant '
                             'on patches, not on windows that straddle them.')
        H, W = x.shape[-2], x.shape[-1]
        if self.training:
            # BN batch statistics are defined over the full-resolution map, so BN runs after the up-sampling; the
            # restore conv (1x1, no bias) commutes with it and runs on the tokens, p^2 times fewer positions
            t = upsample_patches(self.restore(self._attend(x)), (H, W), self.patch_size)
            logit = self.restore_norm(t)
            return (logit[:, :, ::stride, ::stride] if stride > 1 else logit).sigmoid()
        size = ((H + stride - 1) // stride, (W + stride - 1) // stride)
        return upsample_patches(self.token_logit(x), size, self.patch_size // stride)
