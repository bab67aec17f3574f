"""Pooling layers: output-size rule, window normalisation, equivalence with the plain formulation, errors."""
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from reference import (
    PlainNlpPool, bilinear, plain_deform_embed, plain_resample, randomize_model, randomize_norms)
from timm_nlp.grammar import POOL_METHODS, PoolSpec
from timm_nlp.layers import (
    DeformConv2d, DynamicConv2d, GaussianPool2d, LearnedPosEmbed2d, SelfAttentiveImportance, WeightedPool2d,
    create_pool2d, nearest_index, nlp_embed_dim, prepool_args, resample_at_offsets, set_dynamic_temperature,
    stage_pool_args, upsample_nearest)

SIZES = list(range(1, 10)) + [31, 32, 33, 56, 57]
LAYERS = [m for m in POOL_METHODS if m != 'skip'] + ['nlp_headfix2_nowin_reduced', 'dfmixp_reduced', 'mixp_reduced']
WIN_NORM = ['lip', 'nlp', 'nlp_headfix2', 'dfmnlp', 'mixp', 'dfmixp_headfix2', 'mixp_reduced']


def _floor(n: int, s: int) -> int:
    return max(1, n // s)


@pytest.mark.parametrize('name', LAYERS)
@pytest.mark.parametrize('stride', [1, 2, 3, 4])
def test_output_size(name, stride):
    """Floor mode, as the paper's nn.AvgPool2d(s, s); a map smaller than the window gives one position (the paper's
    code crashes there); ceil mode (the in-block placement) gives ceil(H / s)."""
    torch.manual_seed(0)
    m = create_pool2d(name, 16, stride).eval()
    ceil = create_pool2d(name, 16, stride, ceil_mode=True).eval()
    with torch.no_grad():
        for h, w in itertools.product(SIZES, SIZES):
            x = torch.randn(1, 16, h, w)
            assert m(x).shape == (1, 16, _floor(h, stride), _floor(w, stride)), (name, stride, h, w)
            assert ceil(x).shape == (1, 16, -(-h // stride), -(-w // stride)), (name, stride, h, w)
    m.train()
    for h, w in [(1, 1), (5, 7), (31, 33), (57, 56)]:
        assert m(torch.randn(2, 16, h, w)).shape == (2, 16, _floor(h, stride), _floor(w, stride))


def test_max_and_avg_pool_are_the_paper_windows():
    x = torch.randn(2, 3, 9, 6)
    torch.testing.assert_close(create_pool2d('maxp', 3, 2)(x), F.max_pool2d(x, 2, 2))
    torch.testing.assert_close(create_pool2d('avgp', 3, 4)(x), F.avg_pool2d(x, 4, 4))
    # smaller than the window: the one window is the whole axis
    torch.testing.assert_close(create_pool2d('avgp', 3, 4)(x[:, :, :3]), x[:, :, :3, :4].mean((2, 3), keepdim=True))
    torch.testing.assert_close(create_pool2d('maxp', 3, 8)(x), x.amax((2, 3), keepdim=True))
    torch.testing.assert_close(create_pool2d('avgp', 3, 2)(x[0]), F.avg_pool2d(x[0], 2))  # unbatched


@pytest.mark.parametrize('name', WIN_NORM)
@pytest.mark.parametrize('train', [False, True])
def test_window_norm_keeps_constant(name, train):
    torch.manual_seed(0)
    m = create_pool2d(name, 32, 2)
    randomize_model(m)
    m.train(train)
    x = (torch.rand(3, 32, 1, 1) * 4 - 2).expand(3, 32, 19, 22).contiguous()
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y, x[:, :, :9, :11], atol=1e-6, rtol=1e-6)
    # the property is not vacuous: without window normalisation the same input is rescaled
    nowin = create_pool2d(name.replace('lip', 'nlp') + '_nowin', 32, 2).train(train)
    with torch.no_grad():
        assert (nowin(x) - x[:, :, :9, :11]).abs().max() > 1e-2


def _run(pool, module, x, cot):
    xi = x.clone().requires_grad_()
    pool.zero_grad(set_to_none=True)
    y = module(xi)
    (y * cot).sum().backward()
    return y.detach(), xi.grad, {n: p.grad.clone() for n, p in pool.named_parameters() if p.grad is not None}


def _assert_grads_close(g: dict, g_ref: dict, rel: float, what: str) -> float:
    """Same parameters, each gradient within ``rel`` of the largest reference gradient; returns that scale."""
    assert g.keys() == g_ref.keys(), what
    scale = max((v.abs().max().item() for v in g_ref.values()), default=0.)
    for n in g:
        err = (g[n] - g_ref[n]).abs().max().item()
        assert err <= rel * scale, f'{what} {n}: gradient differs by {err:.3g} (scale {scale:.3g})'
    return scale


# (name, input size, stride, create_pool2d args). The patch sizes cover tokens = pixels (p = 1), token grids that
# do not tile the map (uneven pixels per token: BN weights them), windows that straddle patches, windows that hold
# several patches (s % p == 0), maps smaller than a patch, dynamic restore convs and deformable embeddings.
EQUIV_CASES = [
    ('nlp', (12, 12), 2, {}), ('nlp_headfix2', (13, 10), 2, {}), ('nlp_nowin', (12, 11), 2, dict(num_heads=4)),
    ('nlp', (13, 11), 2, dict(patch_size=3)), ('nlp_nowin', (10, 14), 3, dict(patch_size=4)),
    ('nlp', (16, 12), 4, dict(patch_size=2)), ('nlp', (3, 13), 2, dict(patch_size=4)),
    ('nlp', (13, 11), 2, dict(patch_size=3, dynamic=True)), ('nlp_nowin', (9, 12), 2, dict(dynamic=True)),
    ('dfmnlp', (10, 12), 2, {}), ('dfmnlp', (12, 12), 2, dict(patch_size=2)),
    ('dfmnlp', (14, 13), 2, dict(patch_size=3, dynamic=True)), ('dfmnlp_nowin', (9, 8), 3, dict(patch_size=2)),
    ('mixp', (12, 12), 2, {}), ('mixp', (11, 12), 2, dict(patch_size=2)), ('mixp', (12, 9), 2, dict(patch_size=3)),
    ('mixp', (12, 12), 2, dict(patch_size=2, dynamic=True)), ('dfmixp_headfix2', (9, 11), 2, dict(patch_size=2)),
]


@pytest.mark.parametrize('name,size,stride,kwargs', EQUIV_CASES)
@pytest.mark.parametrize('train', [True, False])
def test_nlp_matches_plain_formulation(name, size, stride, kwargs, train):
    """Ours (SDPA; restore conv, BN, sigmoid and exp on the token grid; torchvision's deformable conv and
    grid_sample) against nn.MultiheadAttention written from the formula (the map restored at full resolution, BN
    over it, explicit bilinear sampling): outputs, every gradient and the BN running statistics.

    fp32: output and input gradient to 1e-5; parameter gradients to 5e-4 of the largest parameter gradient, because
    the train-mode BN backward cancels large terms (the key/value/output-projection bias gradients are exactly zero
    in theory and come out as 1e-5..1e-4 relative noise in both implementations). fp64 checks every gradient to
    1e-9 of the largest, so the formulas agree, not just within loose tolerances.
    """
    torch.manual_seed(0)
    m = create_pool2d(name, 32, stride, **kwargs)
    randomize_model(m)
    assert m.non_local.attn.fused_attn, 'the optimised path must run through F.scaled_dot_product_attention'
    ref = PlainNlpPool(m)
    m.train(train), ref.train(train)
    x = torch.randn(2, 32, *size)
    cot = torch.randn(2, 32, _floor(size[0], stride), _floor(size[1], stride))
    for dtype, tol, gtol in ((torch.float32, 1e-5, 5e-4), (torch.float64, 1e-10, 1e-9)):
        m.to(dtype), ref.to(dtype)
        buffers = {n: b.clone() for n, b in m.named_buffers()}
        y, gx, gp = _run(m, m, x.to(dtype), cot.to(dtype))
        stats = {n: b.clone() for n, b in m.named_buffers()}
        m.load_state_dict(buffers, strict=False)  # both runs update the shared BN statistics from the same state
        y_ref, gx_ref, gp_ref = _run(m, ref, x.to(dtype), cot.to(dtype))
        for n, b in m.named_buffers():  # BN running statistics (changed in training only)
            if n.endswith(('running_mean', 'num_batches_tracked')):
                assert torch.equal(b, buffers[n]) != train, n
            torch.testing.assert_close(stats[n], b, atol=tol, rtol=tol, msg=n)
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)
        scale = _assert_grads_close(gp, gp_ref, gtol, str(dtype))
        assert scale > 1e-3, 'vacuous comparison: the importance does not affect the output'


@pytest.mark.parametrize('name', ['nlp_reduced', 'nlp_headfix2_nowin_reduced'])
def test_patches_of_whole_windows(name):
    """Tokens of p x p pixels with s dividing p: the weight is constant in every window, so the window-normalised
    pool is an average pool exactly and the nowin pool is the average pool times the token weight; training still
    computes the importance, whose BN statistics are those of the full-resolution map."""
    torch.manual_seed(0)
    m = create_pool2d(name, 32, 2, patch_size=4).double()
    randomize_model(m)
    ref = PlainNlpPool(m)
    x = torch.randn(2, 32, 16, 24, dtype=torch.float64)
    for train in (True, False):
        m.train(train)
        before = {n: b.clone() for n, b in m.named_buffers()}
        with torch.no_grad():
            y = m(x)
            stats = {n: b.clone() for n, b in m.named_buffers()}
            m.load_state_dict(before, strict=False)
            y_ref = ref.train(train)(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        for n, b in m.named_buffers():
            torch.testing.assert_close(stats[n], b, rtol=1e-12, atol=1e-12)
        if 'nowin' not in name:
            torch.testing.assert_close(y, F.avg_pool2d(x, 2), rtol=1e-12, atol=1e-12)
        else:
            assert (y - F.avg_pool2d(x, 2)).abs().max() > 1e-2


@pytest.mark.parametrize('size,factor', [((6, 3), 41), ((5, 4), 47), ((3, 2), 97), ((4, 4), 2)])
def test_nearest_index_exact_for_every_factor(size, factor):
    # F.interpolate's 'nearest' maps row i to floor(i * float32(1 / factor)), which for factor 41, 47, 97, ... takes
    # the previous patch at some patch starts; every row must come from its own patch
    t = torch.randn(1, 2, *size)
    out = (size[0] * factor - 1, size[1] * factor)
    ref = t.repeat_interleave(factor, -2).repeat_interleave(factor, -1)[:, :, :out[0], :out[1]]
    ref_idx = torch.arange(out[0]) * size[0] // out[0]
    torch.testing.assert_close(nearest_index(out[0], size[0], torch.device('cpu')), ref_idx, rtol=0, atol=0)
    if factor == 2:
        torch.testing.assert_close(upsample_nearest(t, out), F.interpolate(t, size=out, mode='nearest'))
    torch.testing.assert_close(upsample_nearest(t, (size[0] * factor, size[1] * factor)),
                               t.repeat_interleave(factor, -2).repeat_interleave(factor, -1), rtol=0, atol=0)
    assert upsample_nearest(t, out)[:, :, ::factor].shape[-2] == size[0]
    assert ref.shape[-2:] == out


@pytest.mark.parametrize('momentum', [0.1, None])
def test_token_batch_norm_is_the_upsampled_maps(momentum):
    """The restore BN on the tokens: in training, the batch statistics and running-statistics update of BN over
    the nearest up-sampling (tokens covering unequal pixel counts), and the same output and gradients."""
    torch.manual_seed(0)
    nl = SelfAttentiveImportance(6, patch_size=3).double()
    nl.restore_norm.momentum = momentum
    ref_bn = nn.BatchNorm2d(6, momentum=momentum).double()
    ref_bn.load_state_dict(nl.restore_norm.state_dict())
    ref_bn.weight, ref_bn.bias = nl.restore_norm.weight, nl.restore_norm.bias
    t = torch.randn(2, 6, 4, 3, dtype=torch.float64, requires_grad=True)
    size = (13, 10)
    for _ in range(2):
        out = upsample_nearest(nl._restore_norm(t, size), size)
        ref = ref_bn(F.interpolate(t, size=size, mode='nearest'))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in ((nl.restore_norm.running_mean, ref_bn.running_mean),
                     (nl.restore_norm.running_var, ref_bn.running_var),
                     (nl.restore_norm.num_batches_tracked, ref_bn.num_batches_tracked)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(ref)
        grads = torch.autograd.grad(out, (t, nl.restore_norm.weight, nl.restore_norm.bias), g)
        grads_ref = torch.autograd.grad(ref, (t, nl.restore_norm.weight, nl.restore_norm.bias), g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_deformable_embedding_and_resampling_are_the_identity_at_zero_offsets():
    torch.manual_seed(0)
    for k, size in ((1, (7, 9)), (2, (8, 10)), (3, (11, 9))):
        embed = DeformConv2d(5, 8, k).double()
        x = torch.randn(2, 5, *size, dtype=torch.float64)
        out, offset = embed(x)
        assert offset.abs().max() == 0
        # mask = sigmoid(0) = 1/2 at zero init: the regular strided conv of the weight, halved
        torch.testing.assert_close(out, 0.5 * F.conv2d(x, embed.conv.weight, stride=k), rtol=1e-12, atol=1e-12)
        w = torch.rand(2, 3, *size, dtype=torch.float64)
        torch.testing.assert_close(resample_at_offsets(w, offset, k), w, rtol=1e-12, atol=1e-12)
        pool = create_pool2d('dfmnlp', 5, 2, patch_size=k).double().eval()
        plain = create_pool2d('nlp', 5, 2, patch_size=k).double().eval()
        state = {key.replace('patch_embed.conv.', 'patch_embed.'): v for key, v in pool.state_dict().items()
                 if 'patch_embed.offset' not in key and 'patch_embed.mask' not in key}
        with torch.no_grad():
            state['non_local.patch_embed.weight'] = state['non_local.patch_embed.weight'] * 0.5
            state['non_local.patch_embed.bias'] = torch.zeros(plain.non_local.embed_dim, dtype=torch.float64)
            plain.load_state_dict(state)
            torch.testing.assert_close(pool(x), plain(x), rtol=1e-10, atol=1e-10)


def test_resample_and_deformable_embedding_match_explicit_sampling():
    """Non-zero offsets: torchvision's kernel and grid_sample against explicit four-corner bilinear sampling
    (zero outside the map for the embedding, clamped to it for the re-sampling), with sample points off the map."""
    torch.manual_seed(0)
    for k, size, dynamic in ((1, (7, 9), False), (2, (9, 10), True), (3, (11, 9), False)):
        conv = (lambda *a, **kw: DynamicConv2d(*a, num_kernels=3, temperature=1., **kw)) if dynamic else nn.Conv2d
        embed = DeformConv2d(5, 8, k, conv_layer=conv).double()
        randomize_model(embed)
        with torch.no_grad():
            embed.offset.bias.mul_(10)  # several pixels: sample points leave the map
        x = torch.randn(2, 5, *size, dtype=torch.float64)
        out, offset = embed(x)
        ref, ref_offset = plain_deform_embed(embed, x)
        assert offset.abs().max() > 2
        torch.testing.assert_close(offset, ref_offset, rtol=0, atol=0)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        w = torch.rand(2, 3, *size, dtype=torch.float64)
        torch.testing.assert_close(resample_at_offsets(w, offset, k), plain_resample(w, offset, k), rtol=1e-10,
                                   atol=1e-10)
    pts = torch.tensor([[[-1.5, 0.25, 3.0, 4.7]]], dtype=torch.float64)
    img = torch.arange(20, dtype=torch.float64).reshape(1, 1, 4, 5)
    # the explicit sampler itself: zero outside, clamped to the last row
    torch.testing.assert_close(bilinear(img, pts, pts * 0, clamp=False)[0, 0, 0],
                               torch.tensor([0., 1.25, 15., 0.], dtype=torch.float64))
    torch.testing.assert_close(bilinear(img, pts, pts * 0, clamp=True)[0, 0, 0],
                               torch.tensor([0., 1.25, 15., 15.], dtype=torch.float64))


def test_position_embedding_is_detr_row_column():
    pos = LearnedPosEmbed2d(8, num_pos=5)
    emb = pos(3, 4)
    assert emb.shape == (1, 8, 3, 4)
    for i, j in itertools.product(range(3), range(4)):
        torch.testing.assert_close(emb[0, :, i, j], torch.cat([pos.col_embed.weight[j], pos.row_embed.weight[i]]))
    assert pos.row_embed.weight.min() >= 0 and pos.row_embed.weight.max() < 1  # uniform on [0, 1)
    with pytest.raises(ValueError, match=r'Token grid 3x6 is larger than the position table \(5 a side\)'):
        pos(3, 6)
    m = create_pool2d('nlp_headfix2', 4, 2).eval()
    with pytest.raises(ValueError, match=r'Token grid 2x257 is larger than the position table \(256 a side\)'):
        m(torch.randn(1, 4, 2, 257))
    big = create_pool2d('nlp_headfix2', 4, 2, pos_size=300).eval()
    assert big(torch.randn(1, 4, 2, 257)).shape == (1, 4, 1, 128)
    with pytest.raises(ValueError, match='embedding width must be even'):
        LearnedPosEmbed2d(7)


def test_stage_defaults_follow_the_paper_code():
    nlp, fix2, red = (PoolSpec.parse(n) for n in ('nlp', 'nlp_headfix2_nowin', 'nlp_reduced'))
    assert [stage_pool_args(nlp, 'resnet', i)['num_heads'] for i in range(4)] == [4, 8, 16, 32]
    assert [stage_pool_args(nlp, 'mobilenetv2', i)['num_heads'] for i in range(7)] == [2, 4, 8, 16, 32, 64, 128]
    assert {stage_pool_args(fix2, f, i)['num_heads'] for f, i in (('resnet', 3), ('mobilenetv2', 6))} == {2}
    assert [stage_pool_args(red, 'resnet', i)['patch_size'] for i in range(4)] == [4, 2, 1, 1]
    assert [stage_pool_args(red, 'mobilenetv2', i)['patch_size'] for i in range(7)] == [4, 4, 4, 2, 2, 1, 1]
    assert prepool_args(nlp, 6) == dict(patch_size=2, embed_ratio=1., num_heads=8)
    assert prepool_args(PoolSpec.parse('nlp_headfix2_reduced'), 6) == dict(patch_size=6, embed_ratio=.25, num_heads=2)
    # E = max(1, round(r C / h)) h, Python's round (half to even): 160 channels, 64 heads -> round(2.5) = 2
    assert nlp_embed_dim(160, 1., 64) == 128 and nlp_embed_dim(96, 1., 64) == 128 and nlp_embed_dim(320, 1, 128) == 256
    assert nlp_embed_dim(8, 0.25, 8) == 8 and nlp_embed_dim(64, 0.25, 8) == 16
    m = create_pool2d('nlp', 64, 2)
    assert (m.non_local.patch_size, m.non_local.attn.num_heads, m.non_local.embed_dim) == (1, 4, 64)
    m = create_pool2d('mixp_reduced', 64, 2)
    assert m.non_local.patch_size == 4 and m.local.conv.kernel_size == (4, 4) and m.local.conv.padding == 'same'


def test_gaussian_pool_eval_deterministic_train_stochastic():
    torch.manual_seed(0)
    m = GaussianPool2d(8, 2)
    randomize_norms(m)
    x = torch.randn(2, 8, 9, 10)
    m.eval()
    with torch.no_grad():
        y1, y2 = m(x), m(x)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        # the formula: window mean + softplus(MU) * window std (two-pass variance, clamped at 1e-6)
        xs = x[:, :, :8, :10]
        mean = F.avg_pool2d(xs, 2)
        var = F.avg_pool2d(xs.square(), 2) - mean.square()
        z = m.hidden(x.mean((2, 3), keepdim=True))
        torch.testing.assert_close(y1, mean + F.softplus(m.mu(z)) * var.clamp(min=1e-6).sqrt(), rtol=1e-5, atol=1e-5)
        m.train()
        torch.manual_seed(1)
        y3 = m(x)
        torch.manual_seed(1)
        eps = torch.randn(2, 8, 4, 5)
        m2 = GaussianPool2d(8, 2)
        m2.load_state_dict(m.state_dict())
        m2.train()
        z = m2.hidden(x.mean((2, 3), keepdim=True))
        expect = mean + F.softplus(m2.mu(z) + m2.sigma(z).sigmoid() * eps) * var.clamp(min=1e-6).sqrt()
        torch.manual_seed(1)
        torch.testing.assert_close(m(x), expect, rtol=1e-5, atol=1e-5)
    assert (y3 - y1).abs().max() > 1e-3


@pytest.mark.parametrize('dtype,autocast', [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)])
def test_gaussian_pool_low_precision_keeps_window_std(dtype, autocast):
    torch.manual_seed(0)
    m = GaussianPool2d(4, 2).eval()
    x = 100 + torch.randn(1, 4, 8, 8) * 2  # a small spread on a large mean: E[x^2] - E[x]^2 cancels
    if not autocast:
        x = x.to(dtype).float()  # the reference sees the same (rounded) input
    ref = m(x)
    if autocast:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = m(x)
    else:
        y = m.to(dtype)(x.to(dtype))
    assert y.dtype == (dtype if not autocast else torch.float32)
    # the std term survives: the output is within the output rounding of the fp32 result (bf16: 0.5 at 100)
    assert (y.float() - ref).abs().max() <= (0.5 if dtype == torch.bfloat16 else 0.07)


def test_gaussian_pool_fp32_small_spread_on_odd_maps():
    torch.manual_seed(0)
    m = GaussianPool2d(4, 3).eval().double()
    x = 50 + torch.randn(2, 4, 10, 11, dtype=torch.float64) * 1e-2
    ref = m(x)
    y = m.float()(x.float())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device'))])
def test_deform_conv_bf16(device):
    # torchvision's deform_conv2d has no bf16 kernel: the layer computes in fp32 and returns bf16
    torch.manual_seed(0)
    m = create_pool2d('dfmnlp', 8, 2).to(device).eval()
    randomize_model(m)
    x = torch.randn(2, 8, 12, 12, device=device)
    ref = m(x)
    y = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize('name', ['lip', 'gaussian_pool', 'nlp', 'dfmnlp', 'mixp', 'dfmixp'])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    m = create_pool2d(name, 8, 2, **({} if name in ('lip', 'gaussian_pool') else dict(patch_size=2))).train()
    randomize_model(m)
    m(torch.randn(3, 8, 11, 12)).square().sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, n


@pytest.mark.parametrize('name', LAYERS)
def test_batch1_channels_last_bf16(name):
    torch.manual_seed(0)
    m = create_pool2d(name, 8, 2).eval()
    x = torch.randn(1, 8, 9, 10)
    y = m(x)
    y_cl = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_bf = m(x)
    assert y_bf.shape == y.shape and torch.isfinite(y_bf).all()
    assert (y_bf.float() - y).abs().max() < 0.2


@pytest.mark.parametrize('name', LAYERS)
def test_device_and_dtype(name):
    m = create_pool2d(name, 8, 2, device='meta', dtype=torch.float64)
    assert all(t.device.type == 'meta' and t.dtype == torch.float64 for t in m.state_dict().values()
               if t.is_floating_point())
    assert m(torch.empty(2, 8, 10, 10, device='meta', dtype=torch.float64)).shape == (2, 8, 5, 5)


@pytest.mark.parametrize('name', ['lip', 'gaussian_pool', 'nlp', 'dfmixp'])
def test_wrong_channel_count(name):
    m = create_pool2d(name, 8, 2)
    with pytest.raises(ValueError, match=r'expects input \(B, 8, H, W\), got shape \[1, 4, 6, 6\]'):
        m(torch.randn(1, 4, 6, 6))


@pytest.mark.parametrize('name,pattern', [
    ('nlpx', "Unknown pooling method 'nlpx'"), ('nlp_headfix3', "Unknown pooling modifier 'headfix3'"),
    ('lip_nowin', "'lip' takes no modifiers"), ('nlp_nowin_nowin', 'Repeated pooling modifier'),
    ('', 'non-empty string'), ('nlp_', "Unknown pooling modifier ''"),
    ('skip', 'skip is not a pooling layer'),
])
def test_bad_names(name, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_pool2d(name, 8, 2)


@pytest.mark.parametrize('kwargs,pattern', [
    (dict(name='nlp', channels=0), 'channels must be an integer >= 1'),
    (dict(name='nlp', channels=8, stride=0), 'stride must be an integer >= 1'),
    (dict(name='lip', channels=8, num_heads=2), 'num_heads apply to the non-local methods only'),
    (dict(name='nlp', channels=8, num_heads=0), 'num_heads=0'),
    (dict(name='nlp', channels=8, patch_size=0), 'patch_size=0'),
    (dict(name='gaussian_pool', channels=1), 'at least 2 channels'),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_pool2d(**kwargs)


def test_pool_names_case_insensitive_and_canonical():
    assert str(PoolSpec.parse('NLP_Reduced_HeadFix2')) == 'nlp_headfix2_reduced'
    assert isinstance(create_pool2d('DFMIXP_NOWIN', 8, 2), WeightedPool2d)


def test_dynamic_conv_k1_is_plain_conv():
    torch.manual_seed(0)
    for groups, bias, stride, padding in ((1, True, 1, 1), (4, False, 2, 1), (8, True, 3, 0), (2, True, 1, 'same')):
        dyn = DynamicConv2d(8, 16 if groups != 8 else 8, 4 if padding == 'same' else 3, stride, padding,
                            groups=groups, bias=bias, num_kernels=1)
        with torch.no_grad():
            if bias:
                dyn.bias.normal_()
        x = torch.randn(3, 8, 11, 9, requires_grad=True)
        y = dyn(x)
        ref = F.conv2d(x, dyn.kernels[0], dyn.bias[0] if bias else None, stride, padding, groups=groups)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-5,
                                   rtol=1e-5)


def test_dynamic_conv_is_the_paper_codes():
    """Attention: GAP, linear in -> int(in / 4) + 1 without bias (K for an RGB input), ReLU, linear -> K with bias,
    softmax(z / 34); the kernels kaiming-uniform, biases 0; each sample convolved with its mixed kernel."""
    torch.manual_seed(0)
    dyn = DynamicConv2d(12, 6, 3, 1, 1, num_kernels=3)
    assert dyn.fc1.bias is None and dyn.fc1.out_features == 4 and dyn.fc2.out_features == 3
    assert DynamicConv2d(3, 6, 3).fc1.out_features == 4 and dyn.temperature.item() == 34
    assert dyn.bias.abs().max() == 0
    bound = math.sqrt(6 / (12 * 9))  # kaiming-uniform, a = 0, per kernel
    assert dyn.weight.abs().max() <= bound and dyn.weight.abs().max() > 0.9 * bound
    with torch.no_grad():
        dyn.bias.normal_()
    x = torch.randn(2, 12, 7, 7)
    attn = dyn.attention(x)
    z = dyn.fc2(F.relu(dyn.fc1(x.mean((2, 3)))))
    torch.testing.assert_close(attn, F.softmax(z / 34, 1))
    for b in range(2):  # sample b uses its own kernel sum_k attn[b, k] W_k
        w = (attn[b, :, None, None, None, None] * dyn.kernels).sum(0)
        bias = (attn[b, :, None] * dyn.bias).sum(0)
        torch.testing.assert_close(dyn(x)[b:b + 1], F.conv2d(x[b:b + 1], w, bias, padding=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('temperature', [0., -1., math.inf, math.nan])
def test_dynamic_conv_refuses_a_temperature_that_is_not_positive(temperature):
    # 0 gave NaN outputs, a negative one silently inverted the kernel attention
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'):
        DynamicConv2d(4, 4, 3, padding=1, temperature=temperature)
    m = nn.Sequential(DynamicConv2d(4, 4, 3))
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'):
        set_dynamic_temperature(m, temperature)
    assert m[0].temperature.item() == 34.


@pytest.mark.parametrize('groups,bias,stride', [(1, True, 1), (2, False, 2), (4, True, 1)])
def test_dynamic_conv_batch_agnostic_form_is_the_same_function(groups, bias, stride):
    torch.manual_seed(0)
    dyn = DynamicConv2d(8, 12, 3, stride, 1, groups=groups, bias=bias, num_kernels=3, temperature=1.).double()
    if bias:
        with torch.no_grad():
            dyn.bias.normal_()
    x = torch.randn(3, 8, 9, 10, dtype=torch.float64, requires_grad=True)
    g = None
    results = []
    for agnostic in (False, True):  # grouped over the batch, then all K kernels in one conv
        dyn.batch_agnostic = agnostic
        y = dyn(x)
        g = torch.randn_like(y) if g is None else g
        results.append((y, *torch.autograd.grad(y, (x, *dyn.parameters()), g)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
