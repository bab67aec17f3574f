"""Non-local importance of Self-Attentive Pooling (Chen et al., WACV 2023, arXiv 2209.07659).

As the paper's code computes it: a patch embedding (conv k=p, stride p, BN, ReLU; a modulated deformable conv for
dfmnlp), DETR's learned row/column position embedding, multi-head self-attention exactly as
``nn.MultiheadAttention`` defines it (here through timm's ``Attention``, i.e. ``F.scaled_dot_product_attention``:
no N x N matrix), then restore: nearest up-sampling to the input size, conv1x1, BN, sigmoid, and ``w = exp(.)``.

The restore conv, BN, sigmoid and exp are pointwise, so they run on the p^2-times fewer tokens and only their
result is up-sampled (a gather). In training, BN's batch statistics are those of the up-sampled map: the tokens
weighted by how many pixels each one covers, the running variance with the up-sampled map's element count.
"""
import copy
from typing import Callable, Final, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

from timm.layers import Attention

from .dynamic_conv import DynamicConv2d
from .export_ops import ExportError, TwoSchedules, exp_int8, nearest_up, tree_cat
from .protocol import CompoundLayer, PatchSupport

__all__ = [
    'DeformConv2d', 'LearnedPosEmbed2d', 'SelfAttentiveImportance', 'nlp_embed_dim', 'nearest_index',
    'upsample_nearest', 'resample_at_offsets', 'ChunkedAttention', 'balance_chunks',
]

ConvLayer = Callable[..., nn.Module]


def nlp_embed_dim(channels: int, embed_ratio: float, num_heads: int) -> int:
    """Embedding width ``E = max(1, round(ratio * C / heads)) * heads`` (Python's round: half to even)."""
    return max(1, round(embed_ratio * channels / num_heads)) * num_heads


def nearest_index(size_out: int, size_in: int, device: torch.device) -> torch.Tensor:
    """Source index ``(i * size_in) // size_out`` of every output position of a nearest up-sampling: the map of
    ``F.interpolate(mode='nearest')``, in integer arithmetic (its float scale picks the previous source for some
    factors, e.g. 41)."""
    return torch.div(torch.arange(size_out, device=device) * size_in, size_out, rounding_mode='floor')


def upsample_nearest(t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest up-sampling of ``t`` (B, C, h, w) to ``size`` (H, W), as a gather."""
    h, w = t.shape[-2], t.shape[-1]
    if size[0] != h:
        t = t.index_select(2, nearest_index(size[0], h, t.device))
    if size[1] != w:
        t = t.index_select(3, nearest_index(size[1], w, t.device))
    return t


def _upsample_counts(size_out: int, size_in: int, device: torch.device) -> torch.Tensor:
    """How many output positions each source position of a nearest up-sampling covers: source i covers the outputs
    from ``ceil(i * size_out / size_in)`` on."""
    starts = torch.div(torch.arange(size_in + 1, device=device) * size_out + size_in - 1, size_in,
                       rounding_mode='floor')
    return starts[1:] - starts[:-1]


def _coverage(t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """The pixels of a nearest up-sampling to ``size`` that each token of ``t`` (B, C, h, w) covers, (h, w)."""
    rows = _upsample_counts(size[0], t.shape[-2], t.device).to(t.dtype)
    cols = _upsample_counts(size[1], t.shape[-1], t.device).to(t.dtype)
    return rows[:, None] * cols[None, :]


def resample_at_offsets(w: torch.Tensor, offset: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The weight map re-sampled where a deformable patch embedding looked: pixel ``(i k + r, j k + c)`` takes ``w``
    bilinearly at ``(i k + r - dy, j k + c - dx)`` (clamped to the map), with ``(dy, dx)`` the offset of kernel
    position ``(r, c)`` at token ``(i, j)`` (torchvision's layout). Pixels beyond the token grid keep their value.
    """
    H, W = w.shape[-2], w.shape[-1]
    k = kernel_size
    h, wt = offset.shape[-2], offset.shape[-1]
    Hk, Wk = min(h * k, H), min(wt * k, W)
    # (B, (r, c, yx), i, j) -> (B, yx, i * k + r, j * k + c), written without the batch size (an ONNX graph's
    # batch is dynamic)
    off = offset.unflatten(1, (k, k, 2)).permute(0, 3, 4, 1, 5, 2).flatten(4, 5).flatten(2, 3)
    off = off[:, :, :Hk, :Wk]
    ys = torch.arange(Hk, device=w.device, dtype=w.dtype)[None, :, None] - off[:, 0]
    xs = torch.arange(Wk, device=w.device, dtype=w.dtype)[None, None, :] - off[:, 1]
    # align_corners=True: -1 and 1 are the centres of the first and last pixel; border padding clamps to them
    ys = ys * (2. / (H - 1)) - 1. if H > 1 else ys * 0.
    xs = xs * (2. / (W - 1)) - 1. if W > 1 else xs * 0.
    sampled = F.grid_sample(w, torch.stack((xs, ys), -1), mode='bilinear', padding_mode='border', align_corners=True)
    if Hk == H and Wk == W:
        return sampled
    out = w.clone()
    out[:, :, :Hk, :Wk] = sampled
    return out


class LearnedPosEmbed2d(nn.Module):
    """DETR's learned position embedding: token (i, j) gets ``concat(col[j], row[i])``.

    The tables have ``num_pos`` rows (256 in the paper's code); a token grid larger than that is an error.
    """

    def __init__(self, dim: int, num_pos: int = 256, device=None, dtype=None):
        super().__init__()
        if dim % 2:
            raise ValueError(f'LearnedPosEmbed2d: the embedding width must be even (half rows, half columns), '
                             f'got {dim}.')
        dd = {'device': device, 'dtype': dtype}
        self.num_pos = num_pos
        self.row_embed = nn.Embedding(num_pos, dim // 2, **dd)
        self.col_embed = nn.Embedding(num_pos, dim // 2, **dd)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, h: int, w: int) -> torch.Tensor:
        """The embedding of an ``h x w`` token grid, ``(1, dim, h, w)``."""
        if h > self.num_pos or w > self.num_pos:
            raise ValueError(f'Token grid {h}x{w} is larger than the position table ({self.num_pos} a side): use a '
                             f'larger patch size, a smaller input, or pos_size >= {max(h, w)} (a new table).')
        col = self.col_embed.weight[:w].t()[:, None, :].expand(-1, h, w)
        row = self.row_embed.weight[:h].t()[:, :, None].expand(-1, h, w)
        return torch.cat((col, row), 0)[None]


class DeformConv2d(CompoundLayer):
    """Modulated deformable convolution (DCNv2) with kernel = stride = k and no padding, the patch embedding of
    dfmnlp: offsets (2 k^2 channels, torchvision's layout) and mask (k^2) from convs 3x3, stride k, pad 1; the
    sampling is ``torchvision.ops.deform_conv2d`` with the mask.

    ``conv`` holds the sampling kernel, a plain conv or a ``DynamicConv2d`` (whose attention then reads the mean of
    the modulated samples, as the paper's code computes it). Offsets and mask start at zero (mask 1/2).
    """
    dynamic: Final[bool]

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            conv_layer: ConvLayer = nn.Conv2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        k = kernel_size
        self.kernel_size = k
        self.offset = conv_layer(in_chs, 2 * k * k, 3, stride=k, padding=1, bias=True, **dd)
        self.mask = conv_layer(in_chs, k * k, 3, stride=k, padding=1, bias=True, **dd)
        self.conv = conv_layer(in_chs, out_chs, k, stride=k, padding=0, bias=False, **dd)
        self.dynamic = isinstance(self.conv, DynamicConv2d)
        self.reset_offset()

    def reset_offset(self) -> None:
        """Zero the offset and mask branches: the layer samples the regular grid (a backbone's conv init, which
        draws every convolution, calls this after it)."""
        for m in (self.offset, self.mask):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def step_output(self, output: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return output[0]

    def operand_numel(self, x: torch.Tensor, out: torch.Tensor) -> int:
        """The offsets and the mask it samples with: ``3 k^2`` values per output position."""
        B, _, H, W = out.shape
        return B * 3 * self.kernel_size * self.kernel_size * H * W

    def patch_support(self) -> PatchSupport:
        return PatchSupport.whole_map('its sampling offsets are unbounded')

    def export_form(self, in_size: Tuple[int, int], chunk: Optional[int] = None) -> nn.Module:
        raise ExportError('its deformable convolution (torchvision deform_conv2d) has no TFLite op')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The embedding ``(B, out, H // k, W // k)`` and the offsets it sampled with."""
        B, C, H, W = x.shape
        k = self.kernel_size
        h, w = H // k, W // k
        # torchvision has no bf16 kernel (CPU or CUDA) and no autocast rule on the CPU: compute in fp32 or the
        # parameters' dtype. NaN offsets crash its kernel, so they become 0; a NaN input still gives a NaN output.
        dtype = self.conv.weight.dtype
        compute = torch.float32 if dtype == torch.bfloat16 else dtype
        xc = x.to(compute)
        offset = torch.nan_to_num(self.offset(x)[:, :, :h, :w].to(compute))
        mask = self.mask(x)[:, :, :h, :w].to(compute).sigmoid()
        conv = self.conv
        if self.dynamic:
            # per-sample kernels: the batch as groups (offset groups too); attention of the modulated samples' mean
            ones = torch.ones(C, 1, k, k, device=x.device, dtype=compute)
            mean = deform_conv2d(xc, offset, ones, None, (k, k), mask=mask).mean((2, 3)) / (k * k)
            attn = conv.attention_from_mean(mean.to(dtype))
            if conv.batch_agnostic:  # ONNX with a dynamic batch: all K kernels, outputs mixed (K times the MACs)
                out = deform_conv2d(xc, offset, conv.weight.to(compute), None, (k, k), mask=mask)
                out = (out.unflatten(1, (conv.num_kernels, -1)) * attn.to(compute)[:, :, None, None, None]).sum(1)
            else:
                out = deform_conv2d(
                    xc.reshape(1, B * C, H, W), offset.reshape(1, -1, h, w), conv.mixed_weight(attn).to(compute),
                    None, (k, k), mask=mask.reshape(1, -1, h, w)).reshape(B, -1, h, w)
        else:
            # its CUDA backward fails ("internal overlap") on a 1x1 kernel in channels-last strides: an NCHW copy
            weight = conv.weight.to(compute, copy=True, memory_format=torch.contiguous_format)
            out = deform_conv2d(xc, offset, weight, None, (k, k), mask=mask)
        return out.to(dtype), offset.to(dtype)


class SelfAttentiveImportance(nn.Module):
    """Non-local importance weights ``w = exp(sigmoid(BN(restore(attend(embed(x))))))`` of a map of ``channels``.

    Args:
        channels: Input channels C.
        patch_size: Patch (token) size p; the token grid is ``H // p x W // p`` (a map smaller than p is zero-padded
            at the bottom/right for the embedding).
        embed_ratio: Embedding width relative to C (see ``nlp_embed_dim``).
        num_heads: Attention heads.
        deformable: A modulated deformable patch embedding, the weight map re-sampled at the negated offsets
            (dfmnlp).
        conv_layer: The convolution of the embedding, restore and deformable branches (``nn.Conv2d``, or a partial
            of ``DynamicConv2d`` in a dynamic-conv network).
        pos_size: Rows of the position tables.
    """
    deformable: Final[bool]
    dynamic: Final[bool]

    def __init__(
            self,
            channels: int,
            patch_size: int = 1,
            embed_ratio: float = 1.,
            num_heads: int = 4,
            deformable: bool = False,
            conv_layer: ConvLayer = nn.Conv2d,
            pos_size: int = 256,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if patch_size < 1 or num_heads < 1 or embed_ratio <= 0 or pos_size < 1:
            raise ValueError(f'Invalid self-attentive pooling arguments: patch_size={patch_size}, '
                             f'num_heads={num_heads}, embed_ratio={embed_ratio}, pos_size={pos_size} '
                             f'(patch_size, num_heads and pos_size must be >= 1, embed_ratio > 0).')
        embed_dim = nlp_embed_dim(channels, embed_ratio, num_heads)
        self.channels = channels
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.deformable = deformable
        if deformable:
            self.patch_embed = DeformConv2d(channels, embed_dim, patch_size, conv_layer, **dd)
        else:
            self.patch_embed = conv_layer(channels, embed_dim, patch_size, stride=patch_size, padding=0, bias=True,
                                          **dd)
        self.norm = nn.BatchNorm2d(embed_dim, **dd)
        self.act = nn.ReLU(inplace=True)
        self.pos_embed = LearnedPosEmbed2d(embed_dim, pos_size, **dd)
        self.attn = Attention(embed_dim, num_heads=num_heads, qkv_bias=True, **dd)
        self.restore = conv_layer(embed_dim, channels, 1, stride=1, padding=0, bias=True, **dd)
        self.restore_norm = nn.BatchNorm2d(channels, **dd)
        self.dynamic = isinstance(self.restore, DynamicConv2d)
        # nn.MultiheadAttention's init of the projections' weights and biases
        nn.init.xavier_uniform_(self.attn.qkv.weight)
        nn.init.zeros_(self.attn.qkv.bias)
        nn.init.zeros_(self.attn.proj.bias)

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The embedded tokens ``(B, E, H // p, W // p)`` of ``x`` and, if deformable, the offsets it sampled at."""
        x = _fill_patch(x, self.patch_size)
        offset: Optional[torch.Tensor] = None
        if self.deformable:
            t, offset = self.patch_embed(x)
        else:
            t = self.patch_embed(x)
        return self.act(self.norm(t)), offset

    def _restore(self, t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The restore conv of the up-sampled tokens, on the tokens (a dynamic conv's attention reads the mean of
        the up-sampled map, the pixel-weighted mean of the tokens)."""
        conv = self.restore
        h, w = t.shape[-2], t.shape[-1]
        if not self.dynamic or (h == size[0] and w == size[1]):
            return conv(t)
        mean = (t * _coverage(t, size)).sum((2, 3)) / (size[0] * size[1])
        attn = conv.attention_from_mean(mean)
        if conv.batch_agnostic:  # ONNX with a dynamic batch: all K kernels, outputs mixed
            out = F.conv2d(t, conv.weight).unflatten(1, (conv.num_kernels, -1))
            out = (out * attn[:, :, None, None, None]).sum(1)
            return out if conv.bias is None else out + (attn @ conv.bias)[:, :, None, None]
        B, E = t.shape[0], t.shape[1]
        weight = conv.mixed_weight(attn).reshape(B, -1, E)
        out = torch.bmm(weight, t.reshape(B, E, h * w)).reshape(B, -1, h, w)
        bias = conv.mixed_bias(attn)
        return out if bias is None else out + bias.reshape(B, -1, 1, 1)

    def _restore_norm(self, t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The restore BN of the up-sampled tokens, on the tokens. In eval BN is pointwise. In training the batch
        statistics (and the running-statistics update) are those of the up-sampled map: every token weighted by the
        pixels it covers, the unbiased variance over ``B * H * W`` values."""
        bn = self.restore_norm
        h, w = t.shape[-2], t.shape[-1]
        if not bn.training or (h == size[0] and w == size[1]):
            return bn(t)
        cover = _coverage(t, size)
        n = t.shape[0] * size[0] * size[1]
        mean = (t * cover).sum((0, 2, 3)) / n
        dev = t - mean[None, :, None, None]
        var = (dev.square() * cover).sum((0, 2, 3)) / n
        running_mean, running_var, tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
        if bn.track_running_stats and running_mean is not None and running_var is not None and tracked is not None:
            with torch.no_grad():
                tracked.add_(1)
                momentum = bn.momentum if bn.momentum is not None else 1. / float(tracked)
                running_mean.mul_(1. - momentum).add_(mean.detach(), alpha=momentum)
                running_var.mul_(1. - momentum).add_(var.detach(), alpha=momentum * n / max(n - 1, 1))
        out = dev * torch.rsqrt(var + bn.eps)[None, :, None, None]
        if bn.weight is not None and bn.bias is not None:
            out = out * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        return out

    def token_weights(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The weights of every token ``(B, C, h, w)`` (the map is their nearest up-sampling to ``x``'s size, then,
        if deformable, re-sampled at the offsets, which are returned too)."""
        t, offset = self.embed(x)
        return self.weights_of_tokens(t, (x.shape[-2], x.shape[-1])), offset

    def weights_of_tokens(self, t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """The token weights ``(B, C, h, w)`` of embedded tokens ``t`` ``(B, E, h, w)`` of a map of ``size``: position
        embedding, attention over all tokens, restore, BN, ``exp(sigmoid(.))``."""
        B, h, w = t.shape[0], t.shape[-2], t.shape[-1]
        t = t + self.pos_embed(h, w).to(t.dtype)
        t = self.attn(t.flatten(2).transpose(1, 2))
        t = t.transpose(1, 2).reshape(B, self.embed_dim, h, w)
        logit = self._restore_norm(self._restore(t, size), size)
        return logit.sigmoid().exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The importance weights of ``x``, same shape, in (1, e)."""
        w, offset = self.token_weights(x)
        w = upsample_nearest(w, (x.shape[-2], x.shape[-1]))
        if offset is not None:
            w = resample_at_offsets(w, offset, self.patch_size)
        return w

    def export_form(self, in_size: Tuple[int, int], chunk: Optional[int] = None) -> '_NonLocalExport':
        """The importance of a map of ``in_size`` in the ops TFLite Micro runs (batch 1, eval), its attention in
        query chunks of ``chunk`` rows."""
        if self.deformable:
            raise ExportError('its deformable embedding (torchvision deform_conv2d) has no TFLite op')
        if self.dynamic:
            raise ExportError('its dynamic convolutions mix per-sample kernels at run time; TFLite convolutions '
                              'take constant weights')
        return _NonLocalExport(self, in_size, chunk)


class ChunkedAttention(nn.Module):
    """timm's ``Attention`` (without norms, as the non-local importance uses it) on one sample's tokens ``(1, N, E)``,
    its queries in chunks of ``chunk`` rows, so that no more than ``chunk x N`` scores exist at a time.

    Every product is a 2-D ``F.linear`` (FULLY_CONNECTED, the keys and the transposed values as its weights), the
    ``1 / sqrt(d)`` scale is folded into the query projection, each head's queries are split into the chunks at once
    and the chunks' outputs are concatenated in a tree. Every op is int8 in TFLite Micro (rows of scores longer than
    its int8 SOFTMAX takes get an int16 softmax output, see ``timm_nlp.deploy``). The heads run one after another,
    their queries, keys and values projected jointly (``forward``: one FULLY_CONNECTED, ``N x 3E`` held until the
    last head's turn) or by each head when its turn comes (``forward(t, per_head=True)``, ``head``: three each, less
    held at a time, more ops).

    Args:
        attn: timm ``Attention``.
        chunk: Query rows per chunk (None: all).
        tokens: The tokens N it attends over, where known (``balance_chunks`` reads it).
        scales: Per head, the factor its tokens come multiplied by to ``head`` (its projections divide it back;
            default 1).
    """

    def __init__(self, attn: Attention, chunk: Optional[int] = None, tokens: Optional[int] = None,
                 scales: Optional[Sequence[float]] = None):
        super().__init__()
        if chunk is not None and chunk < 1:
            raise ValueError(f'chunk must be at least 1, not {chunk}.')
        E = attn.qkv.in_features
        self.heads, self.dim, self.chunk, self.tokens = attn.num_heads, E // attn.num_heads, chunk, tokens
        self.scales = [1.] * self.heads if scales is None else [float(s) for s in scales]
        if len(self.scales) != self.heads or min(self.scales) <= 0:
            raise ValueError(f'scales must be {self.heads} positive factors (one a head), not {scales}.')
        with torch.no_grad():
            weight = attn.qkv.weight.unflatten(0, (3, self.heads, self.dim)).clone()
            bias = None if attn.qkv.bias is None else attn.qkv.bias.unflatten(0, (3, self.heads, self.dim)).clone()
            weight[0] *= attn.scale
            if bias is not None:
                bias[0] *= attn.scale
            self.qkv = _linear(weight.flatten(0, 2), None if bias is None else bias.flatten())
            weight /= torch.tensor(self.scales, dtype=weight.dtype, device=weight.device)[None, :, None, None]
        self.q, self.k, self.v = (nn.ModuleList(_linear(weight[i, h], None if bias is None else bias[i, h])
                                                for h in range(self.heads)) for i in range(3))
        self.proj = attn.proj

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One head's output ``(N, d)`` from its queries, keys and values ``(N, d)``."""
        N = q.shape[0]
        if N == 1:  # a softmax over one key is 1
            return v
        c = self.chunk or N
        chunks = torch.split(q, c, 0) if c < N else (q,)
        v_t = v.t()
        return tree_cat([F.linear(F.linear(q, k).softmax(-1), v_t) for q in chunks], 0)

    def head(self, t: torch.Tensor, h: int) -> torch.Tensor:
        """Head ``h``'s output ``(N, d)`` on the tokens ``t`` ``(N, E)`` (multiplied by its scale), projected by the
        head alone."""
        if t.shape[0] == 1:  # a softmax over one key is 1
            return self.v[h](t)
        return self._attend(self.q[h](t), self.k[h](t), self.v[h](t))

    def merge(self, heads: List[torch.Tensor]) -> torch.Tensor:
        """The attention's output ``(1, N, E)`` from its heads' outputs."""
        return self.proj(tree_cat(heads, 1))[None]

    def forward(self, t: torch.Tensor, per_head: bool = False) -> torch.Tensor:
        if per_head:
            return self.merge([self.head(t[0] * s if s != 1 else t[0], h) for h, s in enumerate(self.scales)])
        E, d = self.heads * self.dim, self.dim
        qkv = self.qkv(t[0])
        return self.merge([self._attend(qkv[:, h * d:(h + 1) * d], qkv[:, E + h * d:E + (h + 1) * d],
                                        qkv[:, 2 * E + h * d:2 * E + (h + 1) * d]) for h in range(self.heads)])


def balance_chunks(model: nn.Module, chunk: int) -> None:
    """Every ``ChunkedAttention`` of ``model`` that knows its tokens in chunks of as many query rows as hold the
    scores of ``chunk`` rows of the attention over the most tokens: one over fewer tokens holds no more scores at a
    time than that one, in fewer chunks (each chunk is ops for which TFLite Micro keeps nodes and kernel data).

    Args:
        model: A model holding export forms.
        chunk: Query rows per chunk of the attention over the most tokens.
    """
    attns = [m for m in model.modules() if isinstance(m, ChunkedAttention) and m.tokens]
    most = max((a.tokens for a in attns), default=0)
    for a in attns:
        a.chunk = max(chunk, chunk * most // a.tokens)


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias``."""
    fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fc.weight.copy_(weight)
        if bias is not None:
            fc.bias.copy_(bias)
    return fc


class _NonLocalExport(TwoSchedules):
    """The export form of ``SelfAttentiveImportance`` for a map of ``in_size``: its position embedding a constant of
    the token grid, its attention chunked, ``exp`` as a ratio of sigmoids, its up-sampling by constant maps.

    ``lean`` (a choice of memory against ops, both exact): each head projects its own queries, keys and values when
    its turn comes and, from the map (``token_weights``), each head after the first embeds the map again
    (``_Tokens``, its tokens scaled by a power of two so that the converter does not merge it with the first), so
    that neither the joint projection nor the ``N x E`` tokens are held through the first head's attention; from
    given tokens (``weights_of_tokens``, the second pass of patch-based execution) every head reads them. Otherwise
    one joint projection, fewer ops."""

    def __init__(self, nl: SelfAttentiveImportance, in_size: Tuple[int, int], chunk: Optional[int]):
        super().__init__()
        p = nl.patch_size
        self.patch_size, self.size, self.embed_dim = p, in_size, nl.embed_dim
        self.grid = (max(1, in_size[0] // p), max(1, in_size[1] // p))
        self.patch_embed, self.norm, self.act = nl.patch_embed, nl.norm, nl.act
        with torch.no_grad():
            self.register_buffer('pos', nl.pos_embed(*self.grid).flatten(2).transpose(1, 2).contiguous())
        tokens, heads = self.grid[0] * self.grid[1], nl.attn.num_heads
        self.attn = ChunkedAttention(nl.attn, chunk, tokens)
        scales = [2. ** h for h in range(heads)]
        self.attn_of_map = ChunkedAttention(nl.attn, chunk, tokens, scales) if heads > 1 else self.attn
        self.tokens_again = nn.ModuleList(_Tokens(self, s) for s in scales[1:])
        self.restore, self.restore_norm = nl.restore, nl.restore_norm

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.patch_embed(_fill_patch(x, self.patch_size))))

    def _weights(self, t: torch.Tensor) -> torch.Tensor:
        """The token weights ``(1, C, h, w)`` from the attention's output ``t`` ``(1, N, E)``."""
        t = t.transpose(1, 2).reshape(1, self.embed_dim, *self.grid)
        return exp_int8(torch.sigmoid(self.restore_norm(self.restore(t))))

    def weights_of_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """The token weights ``(1, C, h, w)`` of the embedded tokens ``t`` of the whole map."""
        return self._weights(self.attn(t.flatten(2).transpose(1, 2) + self.pos, self.lean))

    def token_weights(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lean or not len(self.tokens_again):
            return self.weights_of_tokens(self.embed(x))
        attn = self.attn_of_map
        heads = [attn.head((self.embed(x).flatten(2).transpose(1, 2) + self.pos)[0], 0)]
        heads += [attn.head(tokens(x), h + 1) for h, tokens in enumerate(self.tokens_again)]
        return self._weights(attn.merge(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nearest_up(self.token_weights(x), (x.shape[-2], x.shape[-1]))


class _Tokens(nn.Module):
    """The tokens ``(N, E)`` of a non-local export form's map multiplied by ``scale`` (> 0): a copy of its embedding
    whose norm and position embedding are scaled (the ReLU between commutes with a positive scale)."""

    def __init__(self, form: _NonLocalExport, scale: float):
        super().__init__()
        self.patch_embed, self.act, self.patch_size = copy.deepcopy(form.patch_embed), form.act, form.patch_size
        self.norm = copy.deepcopy(form.norm)
        with torch.no_grad():
            self.norm.weight.mul_(scale)
            self.norm.bias.mul_(scale)
            self.register_buffer('pos', form.pos[0] * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.patch_embed(_fill_patch(x, self.patch_size))))[0].flatten(1).t() + self.pos


def _fill_patch(x: torch.Tensor, p: int) -> torch.Tensor:
    """``x`` zero-padded at the bottom/right to at least one ``p x p`` patch."""
    H, W = x.shape[-2], x.shape[-1]
    return F.pad(x, (0, max(0, p - W), 0, max(0, p - H))) if H < p or W < p else x
