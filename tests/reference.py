"""Plain, obviously-correct formulations used as references by the tests and the benchmarks.

Written from the formula (docs/pooling.md) with ``nn.MultiheadAttention`` (the N x N attention materialised, as in the
paper's code), the importance map restored at full resolution (``F.interpolate``, then the restore conv and BN as
modules, so BN's statistics are those of the full map), explicit bilinear sampling and explicit window sums. The
reference shares the parameter objects of the module under test, so both see the same weights and their gradients
and BN statistics can be compared.
"""
import copy

import torch
from torch import nn
from torch.nn import functional as F

from timm_nlp.layers import DeformConv2d, DynamicConv2d, GaussianPool2d, WeightedPool2d


def _window(n: int, s: int):
    """(windows, window size) of a floor-mode axis; a map smaller than the window is one window."""
    return (n // s, s) if n >= s else (1, n)


def window_pool(x: torch.Tensor, w: torch.Tensor, s: int, win_norm: bool) -> torch.Tensor:
    """sum(x*w)/sum(w) (or the mean of x*w) over each floor-mode s x s window, by explicit reshapes."""
    B, C, H, W = x.shape
    (Ho, kh), (Wo, kw) = _window(H, s), _window(W, s)

    def win_sum(t):
        return t[..., :Ho * kh, :Wo * kw].reshape(B, C, Ho, kh, Wo, kw).sum((3, 5))

    return win_sum(x * w) / (win_sum(w) if win_norm else kh * kw)


def bilinear(img: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, clamp: bool) -> torch.Tensor:
    """``img`` (B, C, H, W) sampled at points (B, *P): bilinear from the four corners; outside the map each corner
    is zero (``clamp=False``, torchvision's deform_conv2d) or the point is clamped to the map first (``clamp``)."""
    B, C, H, W = img.shape
    if clamp:
        ys, xs = ys.clamp(0, H - 1), xs.clamp(0, W - 1)
    y0, x0 = ys.floor(), xs.floor()
    flat = img.reshape(B, C, H * W)
    out = 0
    for dy in (0, 1):
        for dx in (0, 1):
            yc, xc = y0 + dy, x0 + dx
            weight = (1 - (ys - yc).abs()) * (1 - (xs - xc).abs())
            inside = (yc >= 0) & (yc <= H - 1) & (xc >= 0) & (xc <= W - 1)
            idx = (yc.clamp(0, H - 1) * W + xc.clamp(0, W - 1)).long().reshape(B, 1, -1).expand(B, C, -1)
            val = flat.gather(2, idx).reshape(B, C, *ys.shape[1:])
            out = out + (weight * inside)[:, None] * val
    return out


def sample_points(offset: torch.Tensor, k: int):
    """Rows and columns (B, k*k, h, w) of kernel position n = (r, c) at token (i, j): (i k + r + dy_n, j k + c + dx_n),
    offsets in torchvision's layout (dy_n, dx_n interleaved)."""
    B, _, h, w = offset.shape
    n = torch.arange(k * k, dtype=offset.dtype)
    r, c = (n // k)[None, :, None, None], (n % k)[None, :, None, None]
    i = torch.arange(h, dtype=offset.dtype)[None, None, :, None]
    j = torch.arange(w, dtype=offset.dtype)[None, None, None, :]
    return i * k + r + offset[:, 0::2], j * k + c + offset[:, 1::2]


def plain_deform_embed(embed: DeformConv2d, x: torch.Tensor):
    """The modulated deformable embedding by explicit sampling; (embedding, offsets)."""
    k = embed.kernel_size
    h, w = x.shape[-2] // k, x.shape[-1] // k
    offset = embed.offset(x)[:, :, :h, :w]
    mask = embed.mask(x)[:, :, :h, :w].sigmoid()
    ys, xs = sample_points(offset, k)
    samples = bilinear(x, ys, xs, clamp=False) * mask[:, None]  # (B, C, k*k, h, w)
    conv = embed.conv
    if isinstance(conv, DynamicConv2d):
        attn = conv.attention_from_mean(samples.mean((2, 3, 4)))
        weight = (attn @ conv.weight.reshape(conv.num_kernels, -1)).reshape(x.shape[0], -1, x.shape[1], k * k)
    else:
        weight = conv.weight.reshape(1, conv.weight.shape[0], x.shape[1], k * k).expand(x.shape[0], -1, -1, -1)
    return torch.einsum('becn,bcnhw->behw', weight, samples), offset


def plain_resample(wf: torch.Tensor, offset: torch.Tensor, k: int) -> torch.Tensor:
    """Pixel (i k + r, j k + c) of the token grid takes ``wf`` at (i k + r - dy, j k + c - dx), clamped to the map;
    the pixels beyond the token grid keep theirs."""
    B, C, H, W = wf.shape
    ys, xs = sample_points(-offset, k)  # (B, k*k, h, w): the sample points of the negated offsets
    h, w = offset.shape[-2:]
    vals = bilinear(wf, ys, xs, clamp=True)  # (B, C, k*k, h, w)
    grid = vals.reshape(B, C, k, k, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C, h * k, w * k)
    out = wf.clone()
    Hk, Wk = min(h * k, H), min(w * k, W)
    out[:, :, :Hk, :Wk] = grid[:, :, :Hk, :Wk]
    return out


def conv_same(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv``'s weights applied with ``padding='same'`` as torch defines it, per sample for a dynamic conv."""
    if not isinstance(conv, DynamicConv2d):
        return F.conv2d(x, conv.weight, conv.bias, padding='same')
    attn = conv.attention(x)
    outs = []
    for b in range(x.shape[0]):
        weight = (attn[b, :, None, None, None, None] * conv.kernels).sum(0)
        bias = (attn[b, :, None] * conv.bias).sum(0) if conv.bias is not None else None
        outs.append(F.conv2d(x[b:b + 1], weight, bias, padding='same'))
    return torch.cat(outs)


class PlainNlpPool(nn.Module):
    """A WeightedPool2d with a non-local (and optionally local) importance, in the plain formulation."""

    def __init__(self, pool: WeightedPool2d):
        super().__init__()
        self.pool = pool
        nl = pool.non_local
        self.mha = nn.MultiheadAttention(nl.embed_dim, nl.attn.num_heads, batch_first=True)
        self.mha.in_proj_weight = nl.attn.qkv.weight
        self.mha.in_proj_bias = nl.attn.qkv.bias
        self.mha.out_proj = nl.attn.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, nl = self.pool, self.pool.non_local
        B, C, H, W = x.shape
        p = nl.patch_size
        xe = F.pad(x, (0, max(0, p - W), 0, max(0, p - H)))
        offset = None
        if isinstance(nl.patch_embed, DeformConv2d):
            t, offset = plain_deform_embed(nl.patch_embed, xe)
        else:
            t = nl.patch_embed(xe)
        t = F.relu(nl.norm(t))
        h, w = t.shape[-2:]
        col = nl.pos_embed.col_embed.weight[:w]  # (w, E/2): the token (i, j) gets [col[j], row[i]]
        row = nl.pos_embed.row_embed.weight[:h]
        pos = torch.cat([col[None, :, :].expand(h, w, -1), row[:, None, :].expand(h, w, -1)], -1)
        seq = t.flatten(2).transpose(1, 2) + pos.reshape(h * w, -1)
        out, _ = self.mha(seq, seq, seq)  # need_weights=True: the N x N map is materialised
        t = out.transpose(1, 2).reshape(B, -1, h, w)
        up = F.interpolate(t, size=(H, W), mode='nearest')
        wf = torch.exp(torch.sigmoid(nl.restore_norm(nl.restore(up))))
        if offset is not None:
            wf = plain_resample(wf, offset, p)
        if pool.local is not None:
            wf = wf * torch.exp(torch.sigmoid(pool.local.norm(conv_same(pool.local.conv, x))))
        return window_pool(x, wf, pool.stride, pool.win_norm)


def randomize_norms(m: nn.Module, seed: int = 0) -> None:
    """Give BN layers non-trivial statistics and affine parameters, so eval differs from train."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g) * 0.1)


def randomize_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN parameters and statistics, deformable offsets and masks, dynamic-conv biases, so every branch
    reaches the logits (a deformable embedding starts at zero offsets), and a classifier of unit gain (the paper's
    MobileNetV2 draws it with std 0.01: logits of 1e-3 would make absolute tolerances vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        randomize_norms(model, seed)
        head = model.get_classifier() if hasattr(model, 'get_classifier') else None
        if isinstance(head, nn.Linear):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) / head.in_features ** 0.5)
        for m in model.modules():
            if isinstance(m, DynamicConv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, DeformConv2d):
                for conv in (m.offset, m.mask):
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
                    conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.3)
    return model


def pooling_reaches_logits(model: nn.Module, x: torch.Tensor, min_change: float = 1e-3, output=None) -> bool:
    """Whether perturbing the pooling layers' parameters changes the logits (or ``output(model, x)``) by more than
    ``min_change`` (by default 1e-3, 10x the tolerance of the model-level comparisons), so that those comparisons
    are not vacuous."""
    output = output or (lambda m, inp: m(inp))
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for m in perturbed.modules():
            if isinstance(m, (WeightedPool2d, GaussianPool2d)):
                for p in m.parameters():
                    p.add_(torch.randn_like(p))
        y = output(model, x)
        return bool((output(perturbed, x) - y).abs().max() > min_change)
