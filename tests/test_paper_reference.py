"""The plain reference (paper_reference.py) against the paper's own code, and the reference's own sampling steps.

The comparisons with the paper's code run only where PAPER_CODE_DIR names a checkout of it (the directory that
contains base/models/network.py); everything else here is small and always runs.
"""
import contextlib
import io
import os
import sys
import warnings
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch.nn import functional as F

import paper_reference as pr

PAPER_CODE_DIR = os.environ.get('PAPER_CODE_DIR', '')
HAVE_PAPER = bool(PAPER_CODE_DIR) and os.path.isfile(os.path.join(PAPER_CODE_DIR, 'base', 'models', 'network.py'))
needs_paper = pytest.mark.skipif(
    not HAVE_PAPER, reason='needs the paper code: set PAPER_CODE_DIR to a checkout of it '
                           '(the directory that contains base/models/network.py)')

# Strings whose outputs are compared (every backbone, dy, pre-pools, every non-deformable method).
OUTPUT_CASES = [
    'resnet18-skip-1222', 'resnet18-skip-4222', 'RESNET18-SKIP-1222', 'resnet18-maxp-2222', 'resnet18-avgp-4222',
    'resnet18-lip-2222', 'resnet18-gaussian_pool-2222', 'resnet18-nlp-1222', 'resnet18-nlp-2222',
    'resnet18-nlp_headfix2-2222', 'resnet18-nlp_headfix2_nowin-4222', 'resnet18-nlp_reduced-2222',
    'resnet18-nlp_headfix2_nowin_reduced-4222',
    'resnet50-skip-2222', 'resnet50-lip-1222', 'resnet50-gaussian_pool-4222', 'resnet50-nlp_headfix2-2222',
    'resnet50-nlp_reduced-1222',
    'resnet18_v2-skip-2222', 'resnet18_v2-maxp-2222', 'resnet18_v2-lip-4222', 'resnet18_v2-gaussian_pool-2222',
    'resnet18_v2-nlp-2222', 'resnet18_v2-nlp_headfix2_nowin-1222',
    'resnet50_v2-skip-4222', 'resnet50_v2-avgp-2222', 'resnet50_v2-nlp_reduced-2222',
    'resnet50_v2-nlp_headfix2_nowin_reduced-2222',
    'mobilenet_v2-skip-1222121', 'mobilenet_v2-skip-4222121', 'mobilenet_v2-maxp-2222121',
    'mobilenet_v2-avgp-1222121', 'mobilenet_v2-lip-2222121', 'mobilenet_v2-gaussian_pool-4222121',
    'mobilenet_v2-nlp-1222121', 'mobilenet_v2-nlp_headfix2-2222121', 'mobilenet_v2-nlp_headfix2_nowin-4222121',
    'mobilenet_v2-nlp_reduced-2222121', 'mobilenet_v2-nlp_headfix2_nowin_reduced-1222121',
    'mobilenet-skip-2222121', 'mobilenet-maxp-1222121', 'mobilenet-avgp-2222121', 'mobilenet-lip-4222121',
    'mobilenet-gaussian_pool-2222121', 'mobilenet-nlp-2222121', 'mobilenet-nlp_headfix2-1222121',
    'mobilenet-nlp_headfix2_nowin-2222121', 'mobilenet-nlp_reduced-4222121',
    'mobilenet-nlp_headfix2_nowin_reduced-2222121',
    'dyresnet18-skip-1222', 'dyresnet18-nlp_headfix2-2222', 'dyresnet50-lip-2222', 'dyresnet18_v2-nlp_reduced-2222',
    'dyresnet50_v2-nlp_headfix2_nowin-1222', 'dymobilenet_v2-skip-1222121', 'dymobilenet_v2-nlp_reduced-2222121',
    'dymobilenet-nlp_headfix2-2222121', 'dymobilenet-gaussian_pool-2222121',
    'prepool-nlp_headfix2-4-resnet18-skip-1222', 'PREPOOL-NLP_HEADFIX2-4-RESNET18-SKIP-1222',
    'prepool-lip-6-resnet18-skip-1222', 'prepool-nlp_reduced-4-mobilenet_v2-skip-1222121',
    'prepool-gaussian_pool-2-mobilenet-nlp_headfix2-2222121', 'prepool-maxp-2-resnet50_v2-lip-1222',
    'prepool-avgp-2-mobilenet-skip-1222121', 'prepool-nlp-2-dyresnet18_v2-skip-1222',
    'prepool-nlp_reduced_headfix2-4-resnet50-nlp_headfix2-1222', 'prepool-skip-1-resnet18-nlp-1222',
    'prepool-skip-2-mobilenet_v2-lip-1222121', 'prepool-nlp_headfix2_nowin-2-dymobilenet-skip-1222121',
]

# Layouts only: the deformable methods (the paper's sampler has the bugs listed in docs/fidelity.md; its 'mixp' is our
# 'dfmixp') and ResNet's prepool-skip-S (the paper's ResNet ignores S, so only the layouts agree).
LAYOUT_CASES = [
    'resnet18-dfmnlp-2222', 'resnet18_v2-dfmixp-2222', 'resnet50-mixp-2222', 'dyresnet50_v2-dfmnlp_reduced-2222',
    'mobilenet_v2-dfmnlp_headfix2-2222121', 'mobilenet-mixp_reduced-2222121',
    'dymobilenet-dfmixp_headfix2_nowin-2222121', 'dymobilenet_v2-mixp-1222121', 'prepool-dfmnlp-2-resnet18-skip-1222',
    'prepool-mixp_reduced-4-mobilenet_v2-dfmnlp-1222121', 'prepool-skip-4-resnet18-skip-1222',
    'prepool-skip-2-resnet50_v2-nlp-1222',
]

# Our non-deformable mixp: the paper's nlp layout plus the local branch of its mixp.
MIXP_CASES = ['resnet18-mixp-2222', 'dymobilenet_v2-mixp_reduced-2222121',
              'prepool-mixp-2-resnet18_v2-mixp_headfix2-1222']

Layout = Dict[str, Tuple[int, ...]]


@pytest.fixture(scope='module')
def paper_network() -> Callable[[str], torch.nn.Module]:
    """build(arch) -> the paper code's Network(name_parse(arch)), its prints silenced."""
    if not HAVE_PAPER:
        pytest.skip('needs the paper code: set PAPER_CODE_DIR to a checkout of it '
                    '(the directory that contains base/models/network.py)')
    base = os.path.join(PAPER_CODE_DIR, 'base')
    if base not in sys.path:
        sys.path.insert(0, base)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from models.network import Network, name_parse

    def contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0].contiguous(),) + tuple(args[1:])

    def build(arch: str) -> torch.nn.Module:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            net = Network(name_parse(arch.lower()), num_classes=10)
        # Current PyTorch's F.interpolate keeps the channels-last strides of the paper's re-arranged tokens, and
        # its Dynamic_conv2d's x.view(...) then fails (dy + nlp): a contiguous copy of the input changes no value.
        for m in net.modules():
            if type(m).__name__ == 'Dynamic_conv2d':
                m.register_forward_pre_hook(contiguous_input)
        return net

    return build


def layout(model: torch.nn.Module) -> Layout:
    """State-dict keys and shapes."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def assert_same_layout(expected: Layout, got: Layout) -> None:
    """Equal key sets and shapes, with the differences in the message."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = sorted((k, expected[k], got[k]) for k in set(expected) & set(got) if expected[k] != got[k])
    assert not (missing or extra or shapes), f'missing {missing[:8]}, unexpected {extra[:8]}, shapes {shapes[:8]}'


def _conv_out(n: int, s: int) -> int:
    """Output size of a k=2r+1, pad r conv of stride s."""
    return (n - 1) // s + 1


# A smaller input where the token grid would be large (4096 tokens: the paper's attention weights take GBs).
SIZE_OVERRIDES = {'prepool-skip-1-resnet18-nlp-1222': 32}


def input_size(arch: str) -> int:
    """The smallest of a few square sizes at which the paper code runs (every pooled map >= its window)."""
    if arch in SIZE_OVERRIDES:
        return SIZE_OVERRIDES[arch]
    spec = pr.parse_arch(arch)
    resnet = spec.backbone in pr.RESNET_BACKBONES
    for size in (64, 96, 128, 192, 256):
        n, ok = size, True
        pre = spec.prepool
        stem_stride = 2 if pre is None else (pre.stride if pre.method == 'skip' and not resnet else 1)
        n = _conv_out(n, stem_stride)
        pools = [pr.PoolSpec('maxp', 2)] if (resnet and pre is None) else []
        if pre is not None and pre.method != 'skip':
            pools.append(pre)
        for ps in pools:
            ok &= n >= max(ps.stride, ps.patch)
            n //= ps.stride
        for ps in spec.stages:
            if ps.method == 'skip':
                n = _conv_out(n, ps.stride)
            else:
                ok &= n >= max(ps.stride, ps.patch)
                n //= max(ps.stride, 1)
        if ok and n >= 1:
            return size
    raise AssertionError(f'no input size for {arch}')


def assert_close_rel(got: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """max |got - expected| <= rtol * max |expected| (a relative error on the tensor's scale)."""
    got, expected = got.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-300)
    err = ((got - expected).abs().max() / scale).item()
    assert err <= rtol, f'{what}: relative error {err:.3e} > {rtol:.0e}'


def transplant(paper: torch.nn.Module, arch: str) -> torch.nn.Module:
    """The reference with the paper model's (randomised, fp64) state loaded strictly."""
    ref = pr.build_reference(arch).double()
    ref.load_state_dict(paper.state_dict(), strict=True)
    return ref


@needs_paper
@pytest.mark.parametrize('arch', OUTPUT_CASES)
def test_outputs_match_paper(arch: str, paper_network) -> None:
    torch.manual_seed(0)
    paper = paper_network(arch).double()
    ref = pr.build_reference(arch).double()
    assert_same_layout(layout(paper), layout(ref))
    pr.randomize_reference(paper, seed=0)
    ref = transplant(paper, arch)
    size = input_size(arch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
    paper.eval(), ref.eval()
    with torch.no_grad():
        y_paper, y_ref = paper(x), ref(x)
    assert y_ref.shape == y_paper.shape == (2, 10)
    assert_close_rel(y_ref, y_paper, 1e-9, 'eval logits')
    # Train mode: batch statistics everywhere; batch 4, since BN over a 1x1 map of a batch of 2 amplifies
    # rounding by up to 1/sqrt(eps) per layer. Gaussian pooling draws its noise with one torch.randn per layer in
    # forward order in both models, so the same seed gives the same noise.
    x4 = torch.randn(4, 3, size, size, generator=gen, dtype=torch.float64)
    paper.train(), ref.train()
    with torch.no_grad():
        torch.manual_seed(2)
        y_paper = paper(x4)
        torch.manual_seed(2)
        y_ref = ref(x4)
    assert_close_rel(y_ref, y_paper, 1e-8, 'train logits')
    sd_paper, sd_ref = paper.state_dict(), ref.state_dict()
    for k, v in sd_paper.items():
        if 'running_' in k or 'num_batches_tracked' in k:
            assert_close_rel(sd_ref[k], v, 1e-8, k)


def _as_deformable(arch: str) -> str:
    """The reference string of a paper string: the paper's 'mixp' is 'dfmixp'."""
    return '-'.join('df' + t if t.lower().startswith('mixp') else t for t in arch.split('-'))


@needs_paper
@pytest.mark.parametrize('arch', LAYOUT_CASES)
def test_layout_matches_paper(arch: str, paper_network) -> None:
    paper = paper_network(arch)
    ref = pr.build_reference(_as_deformable(arch))
    assert_same_layout(layout(paper), layout(ref))
    ref.load_state_dict(paper.state_dict(), strict=True)


@needs_paper
@pytest.mark.parametrize('arch', MIXP_CASES)
def test_mixp_layout(arch: str, paper_network) -> None:
    as_nlp = '-'.join('nlp' + t[4:] if t.startswith('mixp') else t for t in arch.split('-'))
    expected = layout(paper_network(as_nlp))
    local = {k: v for k, v in layout(paper_network(arch)).items() if '.local.' in k}
    assert local
    expected.update(local)
    assert_same_layout(expected, layout(pr.build_reference(arch)))


@needs_paper
def test_prepool_skip_stride_resnet(paper_network) -> None:
    """The paper's ResNet ignores S in prepool-skip-S (docs/fidelity.md); the reference's stem conv has stride S."""
    arch = 'prepool-skip-4-resnet18-skip-1222'
    paper, ref = paper_network(arch), pr.build_reference(arch)
    assert paper.net.conv1.stride == (1, 1) and paper.net.pool is None
    assert ref.net.conv1.stride == (4, 4) and ref.net.pool is None


# ----------------------------------------------------------------------------------------------------------------
# The reference's own steps (no paper code needed)
# ----------------------------------------------------------------------------------------------------------------

def test_parse_case_and_modifiers() -> None:
    a = pr.parse_arch('PREPOOL-NLP_REDUCED_HEADFIX2-4-DYRESNET18-NLP_NOWIN_HEADFIX2_REDUCED-1222')
    b = pr.parse_arch('prepool-nlp_headfix2_reduced-4-dyresnet18-nlp_reduced_headfix2_nowin-1222')
    assert a == b and a.dynamic and a.backbone == 'resnet18'
    assert a.prepool == pr.PoolSpec('nlp', 4, patch=4, ratio=0.25, heads=2, win_norm=True)
    assert a.stages[0] == pr.PoolSpec('skip', 1)
    assert a.stages[1] == pr.PoolSpec('nlp', 2, patch=2, ratio=1.0, heads=2, win_norm=False)
    m = pr.parse_arch('mobilenet-nlp-2222121')
    assert [s.heads for s in m.stages] == [2, 4, 8, 16, 2, 64, 2]
    assert m.stages[4] == m.stages[6] == pr.PoolSpec('skip', 1)


@pytest.mark.parametrize('arch', [
    'resnet34-skip-1222', 'resnet18-skip-122', 'resnet18-foo-1222', 'resnet18-nlp_wide-1222',
    'resnet18-lip_headfix2-1222', 'prepool-nlp-resnet18-skip-1222', 'mobilenet_v2-skip-1222',
    'resnet18-nlp_nowin_nowin-1222', 'resnet18-skip-1202'])
def test_parse_rejects(arch: str) -> None:
    with pytest.raises(ValueError):
        pr.parse_arch(arch)


def test_bilinear_matches_grid_sample() -> None:
    """Both sampling modes equal F.grid_sample (align_corners=True) with zeros / border padding."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    ys = torch.rand(2, 4, 6, generator=g, dtype=torch.float64) * 9 - 2  # [-2, 7): inside and outside the map
    xs = torch.rand(2, 4, 6, generator=g, dtype=torch.float64) * 11 - 2
    grid = torch.stack([2 * xs / (7 - 1) - 1, 2 * ys / (5 - 1) - 1], dim=-1)
    for border, mode in ((False, 'zeros'), (True, 'border')):
        want = F.grid_sample(img, grid, mode='bilinear', padding_mode=mode, align_corners=True)
        torch.testing.assert_close(pr.bilinear(img, ys, xs, border=border), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('p', [1, 2, 3])
def test_deform_embed_matches_torchvision(p: int) -> None:
    """The explicit deformable embedding equals torchvision's deform_conv2d with the offsets interleaved."""
    from torchvision.ops import deform_conv2d
    g = torch.Generator().manual_seed(p)
    B, C, E, H, W = 2, 3, 4, 4 * p, 3 * p
    emb = pr.DeformEmbed(C, E, p, dynamic=False).double()
    with torch.no_grad():
        emb.m_conv.weight.normal_(0, 0.5, generator=g)
        emb.m_conv.bias.normal_(0, 0.5, generator=g)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    h, w = H // p, W // p
    offset = torch.randn(B, 2 * p * p, h, w, generator=g, dtype=torch.float64) * 2
    with torch.no_grad():
        got = emb(x, offset)
        mask = torch.sigmoid(emb.m_conv(x))[:, :, :h, :w]
    n = p * p
    interleaved = torch.stack([offset[:, :n], offset[:, n:]], dim=2).reshape(B, 2 * n, h, w)
    want = deform_conv2d(x, interleaved, emb.conv.weight.detach(), stride=p, padding=0, mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('size', [(8, 8), (9, 11), (1, 3)])
def test_dfmnlp_with_zero_offsets_is_nlp(size: Tuple[int, int]) -> None:
    """Zero offsets and a mask of 1: the deformable importance map equals the plain one (every step identity)."""
    torch.manual_seed(0)
    C, p = 6, 2
    dfm = pr.NonLocalWeight(C, 'dfmnlp', p, 1.0, 2, dynamic=False).double()
    nlp = pr.NonLocalWeight(C, 'nlp', p, 1.0, 2, dynamic=False).double()
    pr.randomize_reference(dfm, seed=3)
    with torch.no_grad():
        dfm.offset_conv.offset_conv.weight.zero_()
        dfm.offset_conv.offset_conv.bias.zero_()
        dfm.downsample[0].m_conv.weight.zero_()
        dfm.downsample[0].m_conv.bias.fill_(60.0)  # sigmoid(60) == 1 in fp64
        sd = {k: v for k, v in dfm.state_dict().items() if 'offset_conv' not in k and 'm_conv' not in k}
        sd['downsample.0.weight'] = sd.pop('downsample.0.conv.weight')
        sd['downsample.0.bias'] = torch.zeros(nlp.embed_dim, dtype=torch.float64)
        nlp.load_state_dict(sd, strict=True)
    dfm.eval(), nlp.eval()
    x = torch.randn(2, C, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dfm(x), nlp(x), rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize('arch, size', [
    ('resnet18-nlp_reduced-4222', 32), ('mobilenet_v2-dfmixp_reduced-4222121', 32), ('dyresnet18-mixp-2222', 36),
    ('prepool-dfmnlp_reduced-3-mobilenet-gaussian_pool-2222121', 40), ('resnet50_v2-dfmnlp-2222', 40)])
def test_reference_runs_where_the_paper_crashes(arch: str, size: int) -> None:
    """Maps smaller than the window or patch, and sizes that are not multiples of p, give finite logits."""
    torch.manual_seed(0)
    model = pr.randomize_reference(pr.build_reference(arch).double()).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, size, size, dtype=torch.float64))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
