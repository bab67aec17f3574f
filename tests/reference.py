"""Plain, obviously-correct formulations used as references by the tests and the benchmarks.

Written from ../shared/DESIGN.md §1 with ``nn.MultiheadAttention`` (materialised attention, as in the
paper's code), explicit window sums and up-sampling by repetition. The reference shares the parameter
objects of the module under test, so both see the same weights and their gradients can be compared.
"""
import copy

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import DeformConv2d as TvDeformConv2d

from timm_nlp.layers import DeformConv2d, DynamicConv2d, GaussianPool2d, WeightedPool2d


def window_pool(x: torch.Tensor, w: torch.Tensor, s: int, win_norm: bool) -> torch.Tensor:
    """sum(x*w)/sum(w) (or mean of x*w over the valid elements) of each s x s window, by explicit reshapes."""
    B, C, H, W = x.shape
    Ho, Wo = -(-H // s), -(-W // s)
    pad = (0, Wo * s - W, 0, Ho * s - H)

    def win_sum(t):
        if any(pad):
            t = F.pad(t, pad)
        return t.reshape(B, C, Ho, s, Wo, s).sum((3, 5))

    return win_sum(x * w) / (win_sum(w) if win_norm else win_sum(torch.ones_like(x)))


class PlainNlpPool(nn.Module):
    """WeightedPool2d with a non-local (and optionally local) importance, in the plain formulation."""

    def __init__(self, pool: WeightedPool2d):
        super().__init__()
        nl = pool.nlp
        self.stride, self.win_norm, self.p = pool.stride, pool.win_norm, nl.patch_size
        self.lip = pool.lip
        if isinstance(nl.patch_embed, DeformConv2d):
            self.embed = TvDeformConv2d(nl.patch_embed.weight.shape[1], nl.embed_dim, self.p, stride=self.p, bias=False)
            self.embed.weight = nl.patch_embed.weight
            self.offset = nl.patch_embed.offset
        else:
            self.embed, self.offset = nl.patch_embed, None
        self.norm, self.pos_embed = nl.norm, nl.pos_embed
        self.mha = nn.MultiheadAttention(nl.embed_dim, nl.attn.num_heads, batch_first=True)
        self.mha.in_proj_weight = nl.attn.qkv.weight
        self.mha.in_proj_bias = nl.attn.qkv.bias
        self.mha.out_proj = nl.attn.proj
        self.restore, self.restore_norm = nl.restore, nl.restore_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.p
        xp = F.pad(x, (0, -W % p, 0, -H % p)) if H % p or W % p else x
        t = self.embed(xp, self.offset(xp)) if self.offset is not None else self.embed(xp)
        t = F.relu(self.norm(t))
        Hp, Wp = t.shape[-2:]
        t = t + F.interpolate(self.pos_embed, size=(Hp, Wp), mode='bilinear', align_corners=False)
        seq = t.flatten(2).transpose(1, 2)
        out, _ = self.mha(seq, seq, seq)  # need_weights=True: the N x N map is materialised
        t = out.transpose(1, 2).reshape(B, -1, Hp, Wp)
        if p > 1:
            t = t.repeat_interleave(p, 2).repeat_interleave(p, 3)[:, :, :H, :W]
        logit = torch.sigmoid(self.restore_norm(self.restore(t)))
        if self.lip is not None:
            logit = logit * torch.sigmoid(self.lip.norm(self.lip.conv(x)))
        return window_pool(x, torch.exp(logit), self.stride, self.win_norm)


def randomize_norms(m: nn.Module, seed: int = 0) -> None:
    """Give BN layers non-trivial statistics and affine parameters, so eval differs from train."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g) * 0.1)


def randomize_model(model: nn.Module) -> nn.Module:
    """Random BN parameters and statistics, deformable offsets and larger dynamic kernels, so every branch reaches
    the logits: timm zero-initialises the last BN of each residual branch, and mixing K independent dynamic kernels
    shrinks the signal at every layer."""
    with torch.no_grad():
        randomize_norms(model)
        for m in model.modules():
            if isinstance(m, DeformConv2d):
                m.offset.weight.normal_(0, 0.1)
            if isinstance(m, DynamicConv2d):
                m.weight.mul_(3)
    return model


def pooling_reaches_logits(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether perturbing the pooling layers' parameters changes the logits by more than 1e-3, 10x the tolerance of
    the model-level comparisons (so they are not vacuous: timm zero-initialises the last BN of each residual
    branch, which alone would cut a pooling layer inside it off the logits)."""
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for m in perturbed.modules():
            if isinstance(m, (WeightedPool2d, GaussianPool2d)):
                for p in m.parameters():
                    p.add_(torch.randn_like(p))
        y = model(x)
        return bool((perturbed(x) - y).abs().max() > 1e-3)
