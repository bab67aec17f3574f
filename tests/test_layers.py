"""Pooling layers: output-size rule, window normalisation, equivalence with the plain formulation, errors."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from reference import PlainNlpPool, randomize_norms, window_pool
from timm_nlp.grammar import POOL_METHODS, PoolSpec
from timm_nlp.layers import (
    DeformConv2d, GaussianPool2d, SelfAttentiveImportance, WeightedPool2d, create_pool2d, nlp_defaults,
    scale_by_patches, upsample_patches, window_avg_pool2d)

SIZES = list(range(1, 10)) + [31, 32, 33, 56, 57]
WIN_NORM = ['lip', 'nlp', 'nlp_headfix2', 'nlp_reduced', 'dfmnlp', 'dfmnlp_reduced', 'mixp', 'dfmixp_headfix2_reduced']
# every method, plus the modifiers that change the token grid (reduced: p = 8 at the default reduction)
ALL = list(POOL_METHODS) + ['nlp_headfix2_nowin_reduced', 'dfmixp_reduced']


@pytest.mark.parametrize('name', ALL)
@pytest.mark.parametrize('stride', [1, 2, 4])
def test_output_size(name, stride):
    torch.manual_seed(0)
    m = create_pool2d(name, 16, stride).eval()
    with torch.no_grad():
        for h, w in itertools.product(SIZES, SIZES):
            y = m(torch.randn(1, 16, h, w))
            assert y.shape == (1, 16, -(-h // stride), -(-w // stride)), (name, stride, h, w)
    m.train()
    for h, w in [(1, 1), (5, 7), (31, 33), (57, 56)]:
        y = m(torch.randn(2, 16, h, w))
        assert y.shape == (2, 16, -(-h // stride), -(-w // stride)), (name, stride, h, w)


@pytest.mark.parametrize('name', WIN_NORM)
@pytest.mark.parametrize('train', [False, True])
def test_window_norm_keeps_constant(name, train):
    torch.manual_seed(0)
    m = create_pool2d(name, 32, 2)
    randomize_norms(m)
    m.train(train)
    x = (torch.rand(3, 32, 1, 1) * 4 - 2).expand(3, 32, 19, 22).contiguous()
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y, x[:, :, :10, :11], atol=1e-6, rtol=1e-6)
    # the property is not vacuous: without window normalisation the same input is rescaled
    nowin = create_pool2d(name.replace('lip', 'nlp') + '_nowin', 32, 2).train(train)
    with torch.no_grad():
        assert (nowin(x) - x[:, :, :10, :11]).abs().max() > 1e-2


def _run(pool, module, x, cot):
    xi = x.clone().requires_grad_()
    pool.zero_grad(set_to_none=True)
    y = module(xi)
    (y * cot).sum().backward()
    return y.detach(), xi.grad, {n: p.grad.clone() for n, p in pool.named_parameters()}


def _assert_grads_close(g: dict, g_ref: dict, rel: float, what: str) -> float:
    """Same parameters, each gradient within ``rel`` of the largest reference gradient; returns that scale."""
    assert g.keys() == g_ref.keys(), what
    scale = max((v.abs().max().item() for v in g_ref.values()), default=0.)
    for n in g:
        err = (g[n] - g_ref[n]).abs().max().item()
        assert err <= rel * scale, f'{what} {n}: gradient differs by {err:.3g} (scale {scale:.3g})'
    return scale


# (name, input size, stride, extra args). With window normalisation a patch that covers whole pooling windows
# makes the weight constant in each window (see test_reduced_window_norm_is_avg_pool), so the reduced cases
# use windows that straddle patches, where the importance and its gradients matter.
EQUIV_CASES = [
    ('nlp', (12, 12), 2, {}), ('nlp_headfix2', (13, 10), 2, {}), ('nlp_nowin', (12, 11), 2, {}),
    ('nlp_reduced', (16, 16), 4, dict(reduction=16)), ('nlp_reduced', (20, 13), 2, dict(patch_size=3)),
    ('nlp_headfix2_nowin_reduced', (17, 24), 2, dict(reduction=8)),  # eval: per-patch weights up-sampled, cropped
    ('nlp_headfix2_nowin_reduced', (16, 24), 2, dict(reduction=8)),  # eval: broadcast over whole patches
    ('dfmnlp', (10, 12), 2, {}),
    ('dfmnlp_reduced', (18, 16), 2, dict(patch_size=3)), ('mixp', (12, 12), 2, {}), ('dfmixp_headfix2', (9, 11), 2, {}),
]


@pytest.mark.parametrize('name,size,stride,kwargs', EQUIV_CASES)
@pytest.mark.parametrize('train', [True, False])
def test_nlp_matches_plain_formulation(name, size, stride, kwargs, train):
    """Ours (SDPA; restore conv on the token grid, and in eval BN and sigmoid too) against nn.MultiheadAttention
    written from the formula (restore after the up-sampling).

    fp32: output and input gradient to 1e-5; parameter gradients to 5e-4 of the largest parameter gradient, because
    the train-mode BN backward cancels large terms (the key/value/output-projection bias gradients are exactly zero
    in theory and come out as 1e-5..1e-4 relative noise in both implementations). fp64 checks every gradient to
    1e-9 of the largest, so the formulas agree, not just within loose tolerances.
    """
    torch.manual_seed(0)
    m = create_pool2d(name, 32, stride, **kwargs)
    randomize_norms(m)
    assert m.nlp.attn.fused_attn, 'the optimised path must run through F.scaled_dot_product_attention'
    ref = PlainNlpPool(m)
    m.train(train), ref.train(train)
    x = torch.randn(2, 32, *size)
    cot = torch.randn(2, 32, -(-size[0] // stride), -(-size[1] // stride))
    for dtype, tol, gtol in ((torch.float32, 1e-5, 5e-4), (torch.float64, 1e-10, 1e-9)):
        m.to(dtype), ref.to(dtype)
        buffers = {n: b.clone() for n, b in m.named_buffers()}
        y, gx, gp = _run(m, m, x.to(dtype), cot.to(dtype))
        stats = {n: b.clone() for n, b in m.named_buffers()}
        m.load_state_dict(buffers, strict=False)  # both runs update the shared BN statistics from the same state
        y_ref, gx_ref, gp_ref = _run(m, ref, x.to(dtype), cot.to(dtype))
        for n, b in m.named_buffers():  # BN running statistics (changed in training only)
            assert torch.equal(b, buffers[n]) != train, n
            torch.testing.assert_close(stats[n], b, atol=tol, rtol=tol, msg=n)
        torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)
        scale = _assert_grads_close(gp, gp_ref, gtol, str(dtype))
        assert scale > 1e-3, 'vacuous comparison: the importance does not affect the output'


def test_reduced_window_norm_is_avg_pool():
    """A documented property: with window normalisation and s dividing p, the weight is constant in every
    window, so ``nlp_reduced`` equals average pooling exactly (the paper pairs reduced with nowin)."""
    torch.manual_seed(0)
    m = create_pool2d('nlp_reduced', 32, 2).eval()
    assert m.nlp.patch_size == 8
    x = torch.randn(2, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.avg_pool2d(x, 2), atol=1e-6, rtol=1e-5)
        assert (create_pool2d('nlp_nowin_reduced', 32, 2).eval()(x) - F.avg_pool2d(x, 2)).abs().max() > 1e-2


def test_reduced_defaults_follow_stage():
    spec = PoolSpec.parse('nlp_reduced')
    assert [nlp_defaults(spec, 64, r)['patch_size'] for r in (4, 8, 16, 32, 64)] == [8, 4, 2, 1, 1]
    assert nlp_defaults(PoolSpec.parse('nlp'), 512)['num_heads'] == 32
    assert nlp_defaults(PoolSpec.parse('nlp'), 8)['num_heads'] == 1
    m = create_pool2d('nlp_headfix2_reduced', 64, 2)
    assert (m.nlp.patch_size, m.nlp.attn.num_heads, m.nlp.embed_dim) == (8, 2, 16)
    m = create_pool2d('nlp', 128, 2, reduction=8)
    assert (m.nlp.patch_size, m.nlp.attn.num_heads, m.nlp.embed_dim) == (1, 8, 128)
    assert create_pool2d('nlp_reduced', 64, 4, patch_size=4).nlp.patch_size == 4


def test_window_pool_reference_is_plain_average():
    # the test reference itself: unit weights give the average over the valid part of each window
    x = torch.randn(2, 3, 7, 5)
    torch.testing.assert_close(window_pool(x, torch.ones_like(x), 3, True), F.avg_pool2d(x, 3, 3, ceil_mode=True))
    torch.testing.assert_close(window_pool(x, torch.ones_like(x), 3, False), F.avg_pool2d(x, 3, 3, ceil_mode=True))


@pytest.mark.parametrize('shape,stride,layout,fast', [
    ((2, 3, 8, 6), 2, 'nchw', True),  # the strided-addition path
    ((2, 3, 7, 6), 2, 'nchw', False),  # odd height: ceil-mode windows through F.avg_pool2d
    ((2, 3, 8, 6), 2, 'channels_last', False),
    ((2, 3, 8, 6), 2, 'sliced', False),  # a non-contiguous view
    ((2, 3, 9, 7), 3, 'nchw', False),
])
def test_window_avg_pool_matches_plain_average(shape, stride, layout, fast):
    torch.manual_seed(0)
    base = torch.randn(shape[0], shape[1] * 2, *shape[2:], dtype=torch.float64)
    x = base[:, ::2] if layout == 'sliced' else base[:, :shape[1]].contiguous()
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.detach().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    y, ref = window_avg_pool2d(x, stride), window_pool(ref_x, torch.ones_like(ref_x), stride, False)
    assert (y.grad_fn.name() != 'AvgPool2DBackward0') == fast
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('size,factor', [((8, 12), 4), ((7, 12), 4), ((8, 11), 2), ((6, 6), 1), ((5, 3), 1)])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_scale_by_patches_matches_upsampled_product(size, factor, layout):
    torch.manual_seed(0)
    y = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    w = torch.rand(2, 3, -(-size[0] // factor), -(-size[1] // factor), dtype=torch.float64).requires_grad_()
    y_ref, w_ref = y.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    # the plain formula: every patch weight repeated factor x factor times, cropped to y
    up = w_ref.repeat_interleave(factor, -2).repeat_interleave(factor, -1)[:, :, :size[0], :size[1]]
    out, ref = scale_by_patches(y, w, factor), y_ref * up
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.is_contiguous(memory_format=layout)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('factor', [2, 3, 41, 47, 97])
def test_upsample_patches_exact_for_every_factor(factor):
    # F.interpolate's 'nearest' maps row i to floor(i * float32(1 / factor)), which for factor 41, 47, 97, ... takes
    # the previous patch at some patch starts; every row must come from its own patch
    t = torch.randn(1, 2, 6, 3)
    size = (6 * factor - 1, 3 * factor)
    ref = t.repeat_interleave(factor, -2).repeat_interleave(factor, -1)[:, :, :size[0], :size[1]]
    torch.testing.assert_close(upsample_patches(t, size, factor), ref, rtol=0, atol=0)


def test_nlp_logit_stride_must_divide_patch():
    # the strided logit samples a map that is constant on patches: a stride that straddles patches is refused
    m = SelfAttentiveImportance(8, patch_size=4).eval()
    assert m(torch.randn(1, 8, 8, 8), 2).shape == (1, 8, 4, 4)
    with pytest.raises(ValueError, match='stride 3 must divide the patch size 4'):
        m(torch.randn(1, 8, 8, 8), 3)


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('train', [False, True])
def test_nlp_logit_keeps_input_memory_format(layout, train):
    # a channels-last importance map times an NCHW activation runs a slow strided kernel, and vice versa
    m = create_pool2d('nlp_headfix2_reduced', 16, 2, reduction=8).train(train)
    x = torch.randn(2, 16, 16, 16).contiguous(memory_format=layout)
    with torch.no_grad():
        assert m.nlp(x).is_contiguous(memory_format=layout)


@pytest.mark.parametrize('train', [False, True])
def test_nlp_restore_conv_runs_on_tokens(train):
    # the conv1x1 commutes with the nearest up-sampling (values: test_nlp_matches_plain_formulation); in both modes
    # it must see the token grid, not the p^2 times larger up-sampled map
    m = create_pool2d('nlp_headfix2_nowin_reduced', 16, 2, reduction=8).train(train)
    seen = []
    m.nlp.restore.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    m(torch.randn(2, 16, 18, 16))
    assert m.nlp.patch_size == 4 and seen == [(2, m.nlp.embed_dim, 5, 4)]


def test_gaussian_pool_eval_deterministic_train_stochastic():
    torch.manual_seed(0)
    m = GaussianPool2d(8, 2)
    x = torch.randn(2, 8, 9, 10)
    m.eval()
    with torch.no_grad():
        y1, y2 = m(x), m(x)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        # eval is mean + softplus(mu(GAP(x))) * std of each window
        win = F.pad(x, (0, 0, 0, 1)), F.pad(torch.ones_like(x), (0, 0, 0, 1))
        n = win[1].reshape(2, 8, 5, 2, 5, 2).sum((3, 5))
        mean = win[0].reshape(2, 8, 5, 2, 5, 2).sum((3, 5)) / n
        sq = (win[0] ** 2).reshape(2, 8, 5, 2, 5, 2).sum((3, 5)) / n
        expect = mean + F.softplus(m.mu(x.mean((2, 3), keepdim=True))) * (sq - mean ** 2 + m.eps).sqrt()
        torch.testing.assert_close(y1, expect, atol=1e-5, rtol=1e-5)
        m.train()
        assert (m(x) - m(x)).abs().max() > 1e-3


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('autocast', [False, True])
def test_gaussian_pool_low_precision_keeps_window_std(dtype, autocast):
    # in bf16/fp16, E[x^2] - E[x]^2 cancels most of a window variance that is small next to its mean (this input
    # gave 34% (bf16) and 17% (fp16) relative error); the output must be as precise as its dtype
    torch.manual_seed(0)
    m = GaussianPool2d(8, 2).eval()
    x = (10 + torch.randn(2, 8, 8, 8)).to(dtype)
    with torch.no_grad():
        ref = copy.deepcopy(m).double()(x.double())
        with torch.autocast('cpu', dtype=dtype, enabled=autocast):
            y = (m if autocast else copy.deepcopy(m).to(dtype))(x)
    assert y.dtype == dtype
    assert ((y.double() - ref).abs() / ref.abs()).max() < 2 ** -7


def test_gaussian_pool_fp32_small_spread_on_odd_maps():
    # a map whose spread is small against its mean, on an odd size (ceil mode's 1- and 2-element edge windows): the
    # one-pass E[x^2] - E[x]^2 in fp32 was off by 6.8e-3 in the output and 0.40 in the input gradient (of 2.3)
    torch.manual_seed(0)
    m = GaussianPool2d(4, 2).eval()
    x = 10 + 0.05 * torch.randn(2, 4, 9, 9, dtype=torch.float64)
    x32, x64 = x.float().requires_grad_(), x.clone().requires_grad_()
    y32, y64 = m(x32), copy.deepcopy(m).double()(x64)
    (y32 * torch.arange(y32.numel()).view_as(y32).cos()).sum().backward()
    (y64 * torch.arange(y64.numel()).view_as(y64).cos()).sum().backward()
    assert (y32.double() - y64).abs().max() < 1e-5
    assert (x32.grad.double() - x64.grad).abs().max() < 1e-3 * x64.grad.abs().max()


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device (the CPU case runs in CI)'))])
def test_deform_conv_bf16(device):
    # torchvision has no bf16 kernel for deform_conv2d (CPU or CUDA): the layer runs it in fp32 and returns bf16, the
    # values of the fp32 layer with the bf16 weights on the bf16 input (on the CPU), up to bf16 rounding
    torch.manual_seed(0)
    m = DeformConv2d(8, 8, 3, padding=1).to(torch.bfloat16)
    nn.init.normal_(m.offset.weight, std=0.1)
    x = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16)
    with torch.no_grad():
        y, ref = copy.deepcopy(m).to(device)(x.to(device)).cpu(), m.float()(x.float())
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 2 ** -6 * ref.abs().max()


def test_avgp_accepts_unbatched_input():
    # like nn.AvgPool2d, which it stands for: (C, H, W) as well as (B, C, H, W), on the fast path's even sizes too
    for shape in [(3, 8, 6), (3, 7, 6)]:
        x = torch.randn(shape)
        torch.testing.assert_close(create_pool2d('avgp', 3, 2)(x), F.avg_pool2d(x, 2, 2, ceil_mode=True))


@pytest.mark.parametrize('name', ALL)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    m = create_pool2d(name, 16, 2).train()
    x = torch.randn(2, 16, 16, 16, requires_grad=True)
    (m(x) * torch.randn(2, 16, 8, 8)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f'{name}: no gradient reaches {n}'


@pytest.mark.parametrize('name', ALL)
def test_batch1_channels_last_bf16(name):
    torch.manual_seed(0)
    m = create_pool2d(name, 16, 2).eval()
    x = torch.randn(1, 16, 15, 14)
    with torch.no_grad():
        y = m(x)
        y_cl = m(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(y_cl, y, atol=1e-5, rtol=1e-5)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y_bf = m(x)
    assert torch.isfinite(y_bf).all() and y_bf.shape == y.shape
    m.train()
    y = m(x)
    assert torch.isfinite(y).all() and y.shape == (1, 16, 8, 7)


@pytest.mark.parametrize('name', ALL)
def test_device_and_dtype(name):
    m = create_pool2d(name, 16, 2, device='meta')
    assert all(t.device.type == 'meta' for t in itertools.chain(m.parameters(), m.buffers()))
    m = create_pool2d(name, 16, 2, dtype=torch.float64).eval()
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(torch.randn(2, 16, 9, 9, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize('name', ['lip', 'gaussian_pool', 'nlp', 'dfmixp_reduced'])
def test_wrong_channel_count(name):
    m = create_pool2d(name, 16, 2)
    with pytest.raises(ValueError, match=r'expects input \(B, 16, H, W\), got shape \[2, 8, 8, 8\]'):
        m(torch.randn(2, 8, 8, 8))


@pytest.mark.parametrize('name,pattern', [
    ('foo', r"Unknown pooling method 'foo'.*Valid methods: skip, maxp, avgp, lip, gaussian_pool, nlp"),
    ('nlp_headfix3', r"Unknown pooling modifier 'headfix3'.*Valid modifiers: headfix2, nowin, reduced"),
    ('nlp_nowin_nowin', r'Repeated pooling modifier'),
    ('lip_reduced', r"'lip' takes no modifiers.*apply to: nlp, dfmnlp, mixp, dfmixp"),
    ('', r'non-empty string'),
])
def test_bad_names(name, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_pool2d(name, 16, 2)


@pytest.mark.parametrize('kwargs,pattern', [
    (dict(stride=0), r'stride must be an integer >= 1, got 0'),
    (dict(stride=1.5), r'stride must be an integer >= 1, got 1.5'),
    (dict(channels=0), r'channels must be an integer >= 1'),
    (dict(num_heads=0), r'num_heads=0'),
    (dict(heads=2), r"unexpected arguments \['heads'\].*patch_size, embed_ratio, num_heads, pos_size"),
])
def test_bad_arguments(kwargs, pattern):
    args = dict(name='nlp', channels=16, stride=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        create_pool2d(**args)
    with pytest.raises(ValueError, match=r"valid overrides for 'maxp': none"):
        create_pool2d('maxp', 16, 2, patch_size=2)


def test_pool_names_case_insensitive_and_canonical():
    spec = PoolSpec.parse('NLP_Reduced_HEADFIX2')
    assert str(spec) == 'nlp_headfix2_reduced' and PoolSpec.parse(str(spec)) == spec
    assert PoolSpec.parse('gaussian_pool') == PoolSpec('gaussian_pool')
    assert isinstance(create_pool2d('MixP', 16, 2), WeightedPool2d)
