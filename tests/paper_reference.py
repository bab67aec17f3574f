"""Plain reference implementation of the networks of "Self-Attentive Pooling for Efficient Deep Learning".

Written from this project's specification of what the paper's code computes, with its plain bugs fixed as
docs/fidelity.md lists them, independent of ``timm_nlp``. It holds the paper code's parameter layout (state-dict keys
under ``net.``), so that a state dict of the paper's ``Network(name_parse(arch))`` loads into ``build_reference(arch)``
strictly (for the paper's ``mixp``, which is deformable, load it into ``dfmixp``). Every step is written in its most
literal form: explicit window reshapes, explicit index gathers for up-sampling and bilinear sampling, a per-sample loop
for the dynamic convolution, ``nn.MultiheadAttention`` for attention, ``nn.BatchNorm2d`` at full resolution.

Where the specification left a detail open, this follows the paper code (each such place is marked "paper code:"
below).
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ['PoolSpec', 'ArchSpec', 'parse_arch', 'build_reference', 'randomize_reference', 'PaperReference']

RESNET_BACKBONES = ('resnet18', 'resnet50', 'resnet18_v2', 'resnet50_v2')
MOBILENET_BACKBONES = ('mobilenet_v2', 'mobilenet')
BACKBONES = RESNET_BACKBONES + MOBILENET_BACKBONES
LOCAL_METHODS = ('skip', 'maxp', 'avgp', 'lip', 'gaussian_pool')
NONLOCAL_METHODS = ('nlp', 'dfmnlp', 'mixp', 'dfmixp')
MODIFIERS = ('headfix2', 'nowin', 'reduced')

RESNET_HEADS = (4, 8, 16, 32)
MOBILENET_HEADS = (2, 4, 8, 16, 32, 64, 128)
RESNET_REDUCED_PATCH = (4, 2, 1, 1)
MOBILENET_REDUCED_PATCH = (4, 4, 4, 2, 2, 1, 1)
MOBILENET_STAGES = ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1))
DYNAMIC_K = 4
DYNAMIC_TEMPERATURE = 34.0
MAX_TOKENS_PER_SIDE = 256


# ----------------------------------------------------------------------------------------------------------------
# Architecture strings
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class PoolSpec:
    """One pooling layer: method, stride and (non-local methods) patch size, embed ratio, heads, window norm."""
    method: str
    stride: int
    patch: int = 1
    ratio: float = 1.0
    heads: int = 2
    win_norm: bool = True


@dataclass
class ArchSpec:
    """A parsed seed-form architecture string."""
    backbone: str
    dynamic: bool
    stages: List[PoolSpec] = field(default_factory=list)
    prepool: Optional[PoolSpec] = None  # None: no pre-pool in the string


def _split_pool(token: str) -> Tuple[str, Tuple[str, ...]]:
    """'nlp_headfix2_reduced' -> ('nlp', ('headfix2', 'reduced')); local methods take no modifiers."""
    if token in LOCAL_METHODS:
        return token, ()
    method, *mods = token.split('_')
    if method not in NONLOCAL_METHODS:
        raise ValueError(f'invalid pooling method {token!r}: choose from {LOCAL_METHODS + NONLOCAL_METHODS}')
    for m in mods:
        if m not in MODIFIERS:
            raise ValueError(f'invalid modifier {m!r} in {token!r}: choose from {MODIFIERS}')
    if len(set(mods)) != len(mods):
        raise ValueError(f'repeated modifier in {token!r}')
    return method, tuple(mods)


def parse_arch(arch: str) -> ArchSpec:
    """Parse ``[prepool-POOL-S-][dy]BACKBONE-POOL-STRIDES`` (case-insensitive)."""
    tokens = arch.lower().split('-')
    prepool_tokens = None
    if tokens[0] == 'prepool':
        if len(tokens) != 6:
            raise ValueError(f'invalid architecture {arch!r}: expected prepool-POOL-S-BACKBONE-POOL-STRIDES')
        prepool_tokens, tokens = tokens[1:3], tokens[3:]
    if len(tokens) != 3:
        raise ValueError(f'invalid architecture {arch!r}: expected [prepool-POOL-S-][dy]BACKBONE-POOL-STRIDES')
    net, pool_token, stride_token = tokens
    dynamic = net.startswith('dy')
    backbone = net[2:] if dynamic else net
    if backbone not in BACKBONES:
        raise ValueError(f'invalid backbone {net!r}: choose from {BACKBONES} (optionally prefixed with dy)')
    n_stages = 4 if backbone in RESNET_BACKBONES else 7
    if len(stride_token) != n_stages or not stride_token.isdigit() or '0' in stride_token:
        raise ValueError(f'invalid strides {stride_token!r}: {n_stages} digits 1-9 for {backbone}')
    method, mods = _split_pool(pool_token)
    resnet = backbone in RESNET_BACKBONES
    heads = RESNET_HEADS if resnet else MOBILENET_HEADS
    reduced_patch = RESNET_REDUCED_PATCH if resnet else MOBILENET_REDUCED_PATCH
    stages = []
    for k, digit in enumerate(stride_token):
        s = int(digit)
        if s == 1:
            stages.append(PoolSpec('skip', 1))
        elif method in LOCAL_METHODS:
            stages.append(PoolSpec(method, s))
        else:
            stages.append(PoolSpec(method, s, patch=reduced_patch[k] if 'reduced' in mods else 1, ratio=1.0,
                                   heads=2 if 'headfix2' in mods else heads[k], win_norm='nowin' not in mods))
    spec = ArchSpec(backbone, dynamic, stages)
    if prepool_tokens is not None:
        pmethod, pmods = _split_pool(prepool_tokens[0])
        if not prepool_tokens[1].isdigit() or int(prepool_tokens[1]) < 1:
            raise ValueError(f'invalid pre-pool stride {prepool_tokens[1]!r}: a positive integer')
        ps = int(prepool_tokens[1])
        if pmethod in LOCAL_METHODS:
            spec.prepool = PoolSpec(pmethod, ps)
        else:
            # paper code: the pre-pool always normalises its windows (name_parse ignores `nowin` there)
            reduced = 'reduced' in pmods
            spec.prepool = PoolSpec(pmethod, ps, patch=ps if reduced else 2, ratio=0.25 if reduced else 1.0,
                                    heads=2 if 'headfix2' in pmods else 8, win_norm=True)
    return spec


# ----------------------------------------------------------------------------------------------------------------
# Convolutions: static and dynamic
# ----------------------------------------------------------------------------------------------------------------

class DynamicAttention(nn.Module):
    """pi = softmax(fc2(relu(fc1(GAP(x)))) / T) over the K kernels."""

    def __init__(self, in_ch: int, k: int = DYNAMIC_K, temperature: float = DYNAMIC_TEMPERATURE) -> None:
        super().__init__()
        hidden = k if in_ch == 3 else int(in_ch * 0.25) + 1
        self.fc1 = nn.Conv2d(in_ch, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, k, 1, bias=True)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=(2, 3), keepdim=True)
        logits = self.fc2(F.relu(self.fc1(z))).flatten(1)
        return torch.softmax(logits / self.temperature, dim=1)


class DynamicConv2d(nn.Module):
    """Dynamic convolution: per sample b, conv(x_b, sum_k pi_bk W_k) + sum_k pi_bk b_k (a plain loop over b)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding=0, groups: int = 1,
                 bias: bool = True, k: int = DYNAMIC_K) -> None:
        super().__init__()
        self.stride, self.padding, self.groups, self.k = stride, padding, groups, k
        self.weight = nn.Parameter(torch.empty(k, out_ch, in_ch // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(k, out_ch)) if bias else None
        self.attention = DynamicAttention(in_ch, k)
        for i in range(k):
            nn.init.kaiming_uniform_(self.weight[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pi = self.attention(x)
        outs = []
        for b in range(x.shape[0]):
            w = sum(pi[b, i] * self.weight[i] for i in range(self.k))
            bias = sum(pi[b, i] * self.bias[i] for i in range(self.k)) if self.bias is not None else None
            outs.append(F.conv2d(x[b:b + 1], w, bias, self.stride, self.padding, 1, self.groups))
        return torch.cat(outs, dim=0)


def make_conv(dynamic: bool, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding=0,
              groups: int = 1, bias: bool = False) -> nn.Module:
    """nn.Conv2d, or DynamicConv2d with the same geometry."""
    if dynamic:
        return DynamicConv2d(in_ch, out_ch, kernel_size, stride, padding, groups, bias)
    return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=bias)


# ----------------------------------------------------------------------------------------------------------------
# Windows, up-sampling, bilinear sampling
# ----------------------------------------------------------------------------------------------------------------

def windows(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B,C,H,W) -> (B,C,Ho,kh,Wo,kw): s x s windows, floor mode; a side shorter than s is one window."""
    B, C, H, W = x.shape
    kh, kw = min(s, H), min(s, W)
    ho, wo = H // kh, W // kw
    return x[:, :, :ho * kh, :wo * kw].reshape(B, C, ho, kh, wo, kw)


def window_mean(x: torch.Tensor, s: int) -> torch.Tensor:
    """Mean over each window."""
    return windows(x, s).mean(dim=(3, 5))


def window_max(x: torch.Tensor, s: int) -> torch.Tensor:
    """Max over each window."""
    return windows(x, s).amax(dim=(3, 5))


def nearest_upsample(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Nearest up-sampling of (B,E,h,w) to (H,W): source index (dst * h) // H."""
    h, w = t.shape[-2:]
    rows = torch.arange(H, device=t.device) * h // H
    cols = torch.arange(W, device=t.device) * w // W
    return t.index_select(2, rows).index_select(3, cols)


def _gather(img: torch.Tensor, yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """img (B,C,H,W), integer in-map indices yi, xi (B,*S) -> (B,C,*S)."""
    B, C, H, W = img.shape
    index = (yi * W + xi).reshape(B, 1, -1).expand(B, C, -1)
    return img.reshape(B, C, H * W).gather(2, index).reshape(B, C, *yi.shape[1:])


def bilinear(img: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, border: bool) -> torch.Tensor:
    """Bilinear samples of img (B,C,H,W) at real points (ys, xs) of shape (B,*S) -> (B,C,*S).

    border=False: corners outside the map contribute 0 (torchvision deform_conv2d semantics).
    border=True: the point is clamped to [0,H-1] x [0,W-1] first.
    """
    B, C, H, W = img.shape
    if border:
        ys, xs = ys.clamp(0, H - 1), xs.clamp(0, W - 1)
    y0, x0 = torch.floor(ys), torch.floor(xs)
    out = torch.zeros((B, C) + tuple(ys.shape[1:]), dtype=img.dtype, device=img.device)
    for yc in (y0, y0 + 1):
        for xc in (x0, x0 + 1):
            weight = (1 - (ys - yc).abs()) * (1 - (xs - xc).abs())
            inside = (yc >= 0) & (yc <= H - 1) & (xc >= 0) & (xc <= W - 1)
            values = _gather(img, yc.clamp(0, H - 1).long(), xc.clamp(0, W - 1).long())
            out = out + values * (weight * inside).unsqueeze(1)
    return out


def kernel_points(offset: torch.Tensor, p: int, sign: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Points (i*p + r + sign*dy_n, j*p + c + sign*dx_n), n = r*p + c, as (B, h', p, w', p) row and col tensors.

    offset (B, 2N, h', w'): channels [0, N) row offsets, [N, 2N) column offsets (the paper's layout).
    """
    B, _, h, w = offset.shape
    n = p * p
    dy = offset[:, :n].reshape(B, p, p, h, w).permute(0, 3, 1, 4, 2)  # (B, i, r, j, c)
    dx = offset[:, n:].reshape(B, p, p, h, w).permute(0, 3, 1, 4, 2)
    ar = torch.arange(p, dtype=offset.dtype, device=offset.device)
    base_y = (torch.arange(h, dtype=offset.dtype, device=offset.device)[:, None] * p + ar).reshape(1, h, p, 1, 1)
    base_x = (torch.arange(w, dtype=offset.dtype, device=offset.device)[:, None] * p + ar).reshape(1, 1, 1, w, p)
    return base_y + sign * dy, base_x + sign * dx


# ----------------------------------------------------------------------------------------------------------------
# Pooling layers
# ----------------------------------------------------------------------------------------------------------------

class WindowPool(nn.Module):
    """maxp / avgp: max / mean over s x s windows."""

    def __init__(self, method: str, stride: int) -> None:
        super().__init__()
        self.method, self.stride = method, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_max(x, self.stride) if self.method == 'maxp' else window_mean(x, self.stride)


class WeightedPool(nn.Module):
    """y = mean_win(x*w) / mean_win(w) (or mean_win(x*w) without window norm); w from logit.pool_weight."""

    def __init__(self, weight_module: nn.Module, stride: int, win_norm: bool) -> None:
        super().__init__()
        self.logit = nn.ModuleDict({'pool_weight': weight_module})
        self.stride, self.win_norm = stride, win_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.logit['pool_weight'](x)
        if self.win_norm:
            return window_mean(x * w, self.stride) / window_mean(w, self.stride)
        return window_mean(x * w, self.stride)


class LipWeight(nn.Module):
    """w = exp(sigmoid(BN(conv1x1(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.logit = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=True), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.sigmoid(self.logit(x)))


class GaussianPool(nn.Module):
    """y = mu0 + W * sig0 with W = softplus(MU) (eval) or softplus(MU + sigmoid(SIGMA) * eps) (train)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        hidden = channels // 2
        self.stride = stride
        self.ToHidden = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1, bias=True),
                                      nn.BatchNorm2d(hidden), nn.ReLU())
        self.ToMean = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=True), nn.BatchNorm2d(channels))
        self.ToSigma = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=True), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xw = windows(x, self.stride)
        mu0 = xw.mean(dim=(3, 5), keepdim=True)
        var = ((xw - mu0) ** 2).mean(dim=(3, 5))
        mu0 = mu0[:, :, :, 0, :, 0]
        sig0 = torch.sqrt(torch.clamp(var, min=1e-6))
        z = self.ToHidden(x)
        mu = self.ToMean(z)
        if self.training:
            eps = torch.randn(sig0.shape, dtype=sig0.dtype, device=sig0.device)
            w = F.softplus(mu + torch.sigmoid(self.ToSigma(z)) * eps)
        else:
            w = F.softplus(mu)
        return mu0 + w * sig0


class LearnedPosition(nn.Module):
    """DETR's learned position: token (i, j) gets concat(col[j], row[i])."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(MAX_TOKENS_PER_SIDE, embed_dim // 2)
        self.col_embed = nn.Embedding(MAX_TOKENS_PER_SIDE, embed_dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, h: int, w: int) -> torch.Tensor:
        """(h*w, E), row-major over the token grid."""
        if h > MAX_TOKENS_PER_SIDE or w > MAX_TOKENS_PER_SIDE:
            raise ValueError(f'token grid {h}x{w} exceeds {MAX_TOKENS_PER_SIDE} tokens a side')
        dev = self.row_embed.weight.device
        col = self.col_embed(torch.arange(w, device=dev))  # (w, E/2)
        row = self.row_embed(torch.arange(h, device=dev))  # (h, E/2)
        pos = torch.cat([col[None, :, :].expand(h, w, -1), row[:, None, :].expand(h, w, -1)], dim=-1)
        return pos.reshape(h * w, -1)


class OffsetConv(nn.Module):
    """Holds the deformable offset conv (key ``offset_conv.offset_conv``)."""

    def __init__(self, channels: int, p: int, dynamic: bool) -> None:
        super().__init__()
        self.offset_conv = make_conv(dynamic, channels, 2 * p * p, 3, stride=p, padding=1, bias=True)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)


class DeformEmbed(nn.Module):
    """Modulated deformable patch embedding: mask conv ``m_conv`` and the sampling conv ``conv`` (k=p, stride p)."""

    def __init__(self, channels: int, embed_dim: int, p: int, dynamic: bool) -> None:
        super().__init__()
        self.p = p
        self.m_conv = make_conv(dynamic, channels, p * p, 3, stride=p, padding=1, bias=True)
        nn.init.zeros_(self.m_conv.weight)
        nn.init.zeros_(self.m_conv.bias)
        self.conv = make_conv(dynamic, channels, embed_dim, p, stride=p, padding=0, bias=False)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """x (B,C,H,W), offset (B,2N,h',w') -> (B,E,h',w')."""
        B, C = x.shape[:2]
        p = self.p
        h, w = offset.shape[-2:]
        mask = torch.sigmoid(self.m_conv(x))[:, :, :h, :w]
        mask = mask.reshape(B, p, p, h, w).permute(0, 3, 1, 4, 2)  # (B, i, r, j, c)
        ys, xs = kernel_points(offset, p, +1.0)
        samples = bilinear(x, ys, xs, border=False) * mask.unsqueeze(1)  # (B, C, i, r, j, c)
        image = samples.reshape(B, C, h * p, w * p)  # pixel (i*p + r, j*p + c)
        return self.conv(image)


class NonLocalWeight(nn.Module):
    """Self-attentive importance map of nlp / dfmnlp / mixp / dfmixp."""

    def __init__(self, channels: int, method: str, p: int, ratio: float, heads: int, dynamic: bool) -> None:
        super().__init__()
        self.method, self.p = method, p
        self.deformable = method in ('dfmnlp', 'dfmixp')
        self.mix = method in ('mixp', 'dfmixp')
        embed_dim = max(1, round(ratio * channels / heads)) * heads
        if embed_dim % 2:
            raise ValueError(f'embed dim {embed_dim} must be even for the position tables')
        self.embed_dim = embed_dim
        if self.deformable:
            embed = DeformEmbed(channels, embed_dim, p, dynamic)
            self.offset_conv = OffsetConv(channels, p, dynamic)
        else:
            embed = make_conv(dynamic, channels, embed_dim, p, stride=p, padding=0, bias=True)
        self.downsample = nn.Sequential(embed, nn.BatchNorm2d(embed_dim))
        self.multihead_attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.restore = nn.Sequential(make_conv(dynamic, embed_dim, channels, 1, bias=True), nn.BatchNorm2d(channels))
        self.pos_embed = LearnedPosition(embed_dim)
        if self.mix:
            self.local = nn.Sequential(make_conv(dynamic, channels, channels, p, stride=1, padding='same', bias=True),
                                       nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.p
        xe = x
        if H < p or W < p:  # the embedding sees x zero-padded at the bottom/right to at least p (only then)
            xe = F.pad(x, (0, max(0, p - W), 0, max(0, p - H)))
        h, w = xe.shape[2] // p, xe.shape[3] // p
        if self.deformable:
            offset = self.offset_conv.offset_conv(xe)[:, :, :h, :w]
            t = self.downsample[0](xe, offset)
        else:
            t = self.downsample[0](xe)
        t = F.relu(self.downsample[1](t))  # (B, E, h, w)
        tokens = t.flatten(2).transpose(1, 2) + self.pos_embed(h, w)[None]  # (B, h*w, E)
        attended, _ = self.multihead_attn(tokens, tokens, tokens)
        grid = attended.transpose(1, 2).reshape(B, self.embed_dim, h, w)
        full = nearest_upsample(grid, H, W)
        weight = torch.exp(torch.sigmoid(self.restore(full)))  # (B, C, H, W)
        if self.deformable:  # each weight moves back to where the embedding looked
            ys, xs = kernel_points(offset, p, -1.0)
            moved = bilinear(weight, ys, xs, border=True).reshape(B, C, h * p, w * p)
            hc, wc = min(h * p, H), min(w * p, W)
            weight = weight.clone()
            weight[:, :, :hc, :wc] = moved[:, :, :hc, :wc]
        if self.mix:
            weight = torch.exp(torch.sigmoid(self.local(x))) * weight
        return weight


def make_pool(spec: PoolSpec, channels: int, dynamic: bool) -> Optional[nn.Module]:
    """The pooling layer of a PoolSpec over `channels` channels (None for skip)."""
    m = spec.method
    if m == 'skip':
        return None
    if m in ('maxp', 'avgp'):
        return WindowPool(m, spec.stride)
    if m == 'lip':
        return WeightedPool(LipWeight(channels), spec.stride, True)
    if m == 'gaussian_pool':
        return GaussianPool(channels, spec.stride)
    weight = NonLocalWeight(channels, m, spec.patch, spec.ratio, spec.heads, dynamic)
    return WeightedPool(weight, spec.stride, spec.win_norm)


# ----------------------------------------------------------------------------------------------------------------
# ResNet
# ----------------------------------------------------------------------------------------------------------------

def _shortcut(dynamic: bool, in_ch: int, out_ch: int, stride: int) -> nn.Module:
    return nn.Sequential(make_conv(dynamic, in_ch, out_ch, 1, stride=stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU, then the optional pooling layer."""
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, shortcut_stride: Optional[int], dynamic: bool,
                 pooling: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = make_conv(dynamic, in_ch, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = make_conv(dynamic, planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None if shortcut_stride is None else _shortcut(dynamic, in_ch, planes, shortcut_stride)
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(out + identity)
        return out if self.pooling is None else self.pooling(out)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, + shortcut, ReLU, then the optional pooling layer."""
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, shortcut_stride: Optional[int], dynamic: bool,
                 pooling: Optional[nn.Module] = None) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = make_conv(dynamic, in_ch, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = make_conv(dynamic, planes, planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = make_conv(dynamic, planes, out_ch, 1)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None if shortcut_stride is None else _shortcut(dynamic, in_ch, out_ch, shortcut_stride)
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(out + identity)
        return out if self.pooling is None else self.pooling(out)


class ResNet(nn.Module):
    """The paper's ResNet: stem conv7x7-BN-ReLU, max-pool 2/2 (or the pre-pool), 4 stages, GAP, fc."""

    def __init__(self, spec: ArchSpec, num_classes: int) -> None:
        super().__init__()
        dyn = spec.dynamic
        block = BasicBlock if spec.backbone in ('resnet18', 'resnet18_v2') else Bottleneck
        depths = (2, 2, 2, 2) if block is BasicBlock else (3, 4, 6, 3)
        v2 = spec.backbone.endswith('_v2')
        pre = spec.prepool
        if pre is None:
            stem_stride, self.pool = 2, WindowPool('maxp', 2)
        elif pre.method == 'skip':
            stem_stride, self.pool = pre.stride, None
        else:
            stem_stride, self.pool = 1, make_pool(pre, 64, dyn)
        self.conv1 = make_conv(dyn, 3, 64, 7, stem_stride, 3)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch = 64
        for k, (planes, depth, ps) in enumerate(zip((64, 128, 256, 512), depths, spec.stages)):
            out_ch = planes * block.expansion
            pooled = ps.method != 'skip'
            s = ps.stride
            conv_stride = 1 if pooled else s
            if pooled and v2:
                # paper code: the v2 stage gets its stride-1 shortcut whenever the stage's stride is not 1
                shortcut = 1
            else:
                shortcut = conv_stride if (conv_stride != 1 or in_ch != out_ch) else None
            pool = make_pool(ps, out_ch, dyn) if pooled else None
            blocks = OrderedDict()
            blocks['0'] = block(in_ch, planes, conv_stride, shortcut, dyn, pool if v2 else None)
            for i in range(1, depth):
                blocks[str(i)] = block(out_ch, planes, 1, None, dyn)
            if pooled and not v2:
                blocks['pool'] = pool
            setattr(self, f'layer{k + 1}', nn.Sequential(blocks))
            in_ch = out_ch
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.pool is not None:
            x = self.pool(x)
        for k in range(1, 5):
            x = getattr(self, f'layer{k}')(x)
        return self.fc(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------------------------
# MobileNetV2 (mobilenet_v2: pool inside the stage's first block; mobilenet: pool before it)
# ----------------------------------------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """[pw-BN-ReLU6] dw3x3(stride)-BN-ReLU6 pw-linear-BN, + x where residual, then the optional pooling layer."""

    def __init__(self, in_ch: int, out_ch: int, t: int, stride: int, residual: bool, dynamic: bool,
                 pooling: Optional[nn.Module] = None) -> None:
        super().__init__()
        hidden = round(in_ch * t)
        layers = []
        if t != 1:
            layers += [make_conv(dynamic, in_ch, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [make_conv(dynamic, hidden, hidden, 3, stride, 1, groups=hidden), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), make_conv(dynamic, hidden, out_ch, 1), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.residual = residual
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.residual:
            out = x + out
        return out if self.pooling is None else self.pooling(out)


class MobileNetV2(nn.Module):
    """The paper's MobileNetV2: stem conv3x3-BN-ReLU6 (+ pre-pool), 7 stages, conv1x1 to 1280, GAP, classifier."""

    def __init__(self, spec: ArchSpec, num_classes: int) -> None:
        super().__init__()
        dyn = spec.dynamic
        inside = spec.backbone == 'mobilenet_v2'
        pre = spec.prepool
        stem_stride, self.conv1_pool = 2, None
        if pre is not None:
            stem_stride = pre.stride if pre.method == 'skip' else 1
            self.conv1_pool = make_pool(pre, 32, dyn)
        self.conv1 = nn.Sequential(make_conv(dyn, 3, 32, 3, stem_stride, 1), nn.BatchNorm2d(32), nn.ReLU6())
        in_ch = 32
        stages = []
        for (t, c, n), ps in zip(MOBILENET_STAGES, spec.stages):
            pooled = ps.method != 'skip'
            s = ps.stride
            items = []
            if pooled and not inside:
                items.append(make_pool(ps, in_ch, dyn))
            for i in range(n):
                if i == 0:
                    conv_stride = 1 if pooled else s
                    pool = make_pool(ps, c, dyn) if (pooled and inside) else None
                    # residual iff the stride the block is built with is 1 and in == out: mobilenet_v2 builds the
                    # pooled block with the nominal stride s, mobilenet with stride 1 (paper code; no first block
                    # of these stages has in == out, so both read as "no residual")
                    built_stride = s if inside else conv_stride
                    items.append(InvertedResidual(in_ch, c, t, conv_stride, built_stride == 1 and in_ch == c, dyn,
                                                  pool))
                else:
                    items.append(InvertedResidual(c, c, t, 1, True, dyn))
                in_ch = c
            stages.append(nn.Sequential(*items))
        self.features = nn.Sequential(*stages)
        self.conv2 = nn.Sequential(make_conv(dyn, in_ch, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6())
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.conv1_pool is not None:
            x = self.conv1_pool(x)
        x = self.features(x)
        x = self.conv2(x)
        return self.classifier(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------

class PaperReference(nn.Module):
    """Wrapper with child ``net``, as the paper's Network; forward(x) -> logits."""

    def __init__(self, arch: str, num_classes: int = 10) -> None:
        super().__init__()
        self.arch = arch
        self.spec = parse_arch(arch)
        if self.spec.backbone in RESNET_BACKBONES:
            self.net = ResNet(self.spec, num_classes)
        else:
            self.net = MobileNetV2(self.spec, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_reference(arch: str, num_classes: int = 10) -> nn.Module:
    """The reference network of a seed-form architecture string."""
    return PaperReference(arch, num_classes)


def randomize_reference(model: nn.Module, seed: int = 0, offset_std: float = 0.05) -> nn.Module:
    """Random BN statistics and affine parameters, position tables, biases, dynamic kernels, offset/mask convs.

    Works on any module tree with the paper's layout (the paper's Network or the reference): modules are found
    by type and parameters by name, so that every branch reaches the logits.
    """
    g = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, kind: str, a: float, b: float = 0.0) -> None:
        if kind == 'normal':
            v = torch.randn(t.shape, generator=g, dtype=torch.float64) * a + b
        else:
            v = torch.rand(t.shape, generator=g, dtype=torch.float64) * (b - a) + a
        t.copy_(v.to(device=t.device, dtype=t.dtype))

    modules = dict(model.named_modules())
    with torch.no_grad():
        for _, m in sorted(modules.items(), key=lambda kv: kv[0]):
            if isinstance(m, nn.BatchNorm2d):
                fill(m.weight, 'uniform', 0.5, 1.5)
                fill(m.bias, 'normal', 0.1)
                fill(m.running_mean, 'normal', 0.1)
                fill(m.running_var, 'uniform', 0.5, 1.5)
            elif isinstance(m, nn.Embedding):
                fill(m.weight, 'normal', 0.5)
        for name, prm in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            parts = name.split('.')
            owner, leaf = (parts[-2] if len(parts) > 1 else ''), parts[-1]
            if owner in ('offset_conv', 'm_conv'):  # deformable offset / mask convs: small but non-zero
                fill(prm, 'normal', offset_std)
            elif leaf == 'weight' and prm.dim() == 5:  # dynamic kernels (K, out, in/g, k, k)
                fill(prm, 'normal', math.sqrt(2.0 / prm[0, 0].numel()))
            elif leaf == 'bias' and prm.dim() == 2:  # dynamic biases (K, out)
                fill(prm, 'normal', 0.1)
            elif leaf in ('bias', 'in_proj_bias') and prm.dim() == 1 and not isinstance(
                    modules['.'.join(parts[:-1])], nn.BatchNorm2d):  # conv, linear and attention biases
                fill(prm, 'normal', 0.05)
    return model
