"""Export forms (``PoolLayer.export_form``): in float they compute what the layers compute, in the ops TFLite Micro
runs; layers without an exact one say why."""
import itertools

import pytest
import torch
from torch.overrides import TorchFunctionMode
from reference import randomize_norms

from timm_nlp.export_model import export_form_model
from timm_nlp.layers import create_pool2d
from timm_nlp.layers.export_ops import ExportError, ExportedOps, TwoSchedules, WindowsLast, nearest_up, tree_cat
from timm_nlp.layers.self_attn_pool import ChunkedAttention, upsample_nearest
from timm_nlp.models import create_model
from timm_nlp.profiler import deployed_form, tflm_profile


POOLS = [
    ('lip', (13, 11), 2, {}), ('nlp', (12, 12), 2, {}), ('nlp_nowin', (10, 14), 3, dict(patch_size=4)),
    ('nlp', (13, 11), 2, dict(patch_size=3)), ('nlp_nowin', (16, 16), 2, dict(patch_size=2)),
    ('nlp', (16, 16), 2, dict(patch_size=2)), ('mixp', (12, 10), 2, dict(patch_size=2)),
    ('gaussian_pool', (13, 12), 2, {}), ('gaussian_pool', (12, 12), 3, {}), ('gaussian_pool', (1, 5), 2, {}),
    ('gaussian_pool', (1, 1), 2, {}),
    ('nlp_headfix2', (24, 20), 2, {}),
    ('nlp', (3, 13), 2, dict(patch_size=4)), ('avgp', (9, 8), 2, {}), ('maxp', (9, 8), 3, {}),
]


@pytest.mark.parametrize('name, size, stride, kwargs', POOLS)
def test_export_forms_compute_the_layers(name, size, stride, kwargs):
    pool = create_pool2d(name, 8, stride, **kwargs).eval()
    randomize_norms(pool)
    pool = pool.double()
    x = torch.randn(1, 8, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pool(x)
        for chunk, lean in itertools.product((None, 7, 13), (True, False)):  # chunks not dividing the tokens
            form = pool.export_form(size, chunk)
            for m in form.modules():
                if isinstance(m, TwoSchedules):
                    m.lean = lean
            assert torch.allclose(form(x), ref, rtol=0, atol=1e-12 * max(1., ref.abs().max().item())), (chunk, lean)


class _Softmaxes(TorchFunctionMode):
    """The shapes of the softmaxes computed under it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, '__name__', '') == 'softmax':
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_chunked_attention_holds_a_chunk_of_scores():
    """Chunks of c queries: no score matrix larger than c x N is ever computed."""
    pool = create_pool2d('nlp_headfix2', 8, 2).eval()
    attn = ChunkedAttention(pool.non_local.attn, chunk=16)
    t = torch.randn(1, 24 * 25, pool.non_local.embed_dim)
    with torch.no_grad(), _Softmaxes() as seen:
        out = attn(t)
    with torch.no_grad():
        ref = pool.non_local.attn(t)
    assert torch.allclose(out, ref, atol=1e-5)
    # 600 queries, 16 at a time, the last 8; two heads
    assert seen.shapes == [(16, 600)] * 37 + [(8, 600)] + [(16, 600)] * 37 + [(8, 600)]


def test_both_schedules_of_the_chunked_attention_compute_the_attention():
    pool = create_pool2d('nlp_headfix2', 8, 2).eval()
    attn = pool.non_local.attn
    t = torch.randn(1, 50, pool.non_local.embed_dim)
    with torch.no_grad():
        ref = attn(t)
        for scales in (None, [1., 2.]):  # a head's projections divide its tokens' scale back
            chunked = ChunkedAttention(attn, 7, scales=scales)
            assert torch.allclose(chunked(t), ref, atol=1e-5) and torch.allclose(chunked(t, True), ref, atol=1e-5)
        scaled, plain = ChunkedAttention(attn, 7, scales=[1., 4.]), ChunkedAttention(attn, 7)
        assert torch.allclose(scaled.head(t[0] * 4, 1), plain.head(t[0], 1), atol=1e-5)
        one = t[:, :1]  # one token: its softmax is 1
        assert torch.allclose(plain(one, True), attn(one), atol=1e-6)
        assert torch.allclose(plain(one), attn(one), atol=1e-6)
    with pytest.raises(ValueError, match=r'scales must be 2 positive factors \(one a head\), not \[2.0\]'):
        ChunkedAttention(attn, scales=[2.])


def test_smaller_attentions_take_as_many_scores_at_a_time_as_the_largest():
    """``export_form_model``'s chunk is the query rows of the attention over the most tokens; one over fewer tokens
    takes as many rows as hold as many scores, and the model computes what it did."""
    torch.manual_seed(0)
    model = create_model('resnet18_nlp_headfix2_2222', num_classes=10).eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 96, 96)
    form = export_form_model(model, (3, 96, 96), chunk=100)
    with torch.no_grad(), _Softmaxes() as seen:
        out = form(x)
    with torch.no_grad():
        assert torch.allclose(out, model(x), atol=1e-4)
    # 576 tokens in layer1: 100 rows at a time (57,600 scores); layer2's 144 tokens: 400 rows hold as many, so all
    # 144 at once; layer3 (36), layer4 (9): all; two heads each
    assert seen.shapes[:12] == ([(100, 576)] * 5 + [(76, 576)]) * 2
    assert seen.shapes[12:] == [(144, 144)] * 2 + [(36, 36)] * 2 + [(9, 9)] * 2
    whole = export_form_model(model, (3, 96, 96), chunk=None)
    with torch.no_grad(), _Softmaxes() as seen:
        whole(x)
    assert seen.shapes == [(576, 576)] * 2 + [(144, 144)] * 2 + [(36, 36)] * 2 + [(9, 9)] * 2


def test_later_heads_embed_the_map_again_rather_than_hold_its_tokens():
    """From the map, a non-local form's second head re-embeds it (a scaled copy of the embedding): the tokens (N x E)
    are not held through the first head's attention, which from given tokens (patch-based execution) they are."""
    pool = create_pool2d('nlp_headfix2', 16, 2).eval()  # E = 16, two heads of 8
    randomize_norms(pool)
    form = pool.export_form((32, 32), 64).non_local
    x = torch.randn(1, 16, 32, 32)

    class Weights(torch.nn.Module):
        """The token weights, and the map (which the pool reads again)."""

        def __init__(self, from_tokens: bool):
            super().__init__()
            self.form, self.from_tokens = form, from_tokens

        def forward(self, x):
            f = self.form
            return f.weights_of_tokens(f.embed(x)) if self.from_tokens else f.token_weights(x), x
    with torch.no_grad():
        assert torch.allclose(Weights(False)(x)[0], Weights(True)(x)[0], rtol=1e-5, atol=1e-6)
    of_map, of_tokens = (tflm_profile(Weights(b), (16, 32, 32)).peak_bytes for b in (False, True))
    N, d = 32 * 32, 8
    assert of_map <= of_tokens - N * d, (of_map, of_tokens)


def test_only_the_pools_at_the_peak_take_the_lean_schedule():
    """``deployed_form`` makes a form lean (more ops, less held) only where that lowers the counted peak: here
    layer1's attention (576 tokens) is the peak, the later pools' are not."""
    size = (3, 96, 96)
    form = deployed_form(create_model('resnet18_nlp_headfix2_2222', num_classes=10, device='meta'), size, 100)
    forms = [m for m in form.modules() if isinstance(m, TwoSchedules)]
    assert [f.lean for f in forms] == [True, False, False, False]
    chosen = tflm_profile(form, size)
    forms[0].lean = False
    assert tflm_profile(form, size).peak_bytes > chosen.peak_bytes + 576 * 8  # layer1's joint projection held
    forms[0].lean = forms[1].lean = True
    lean = tflm_profile(form, size)
    assert lean.peak_bytes == chosen.peak_bytes and len(lean.layers) > len(chosen.layers)


def test_nearest_up_and_tree_cat_are_the_layers_ops():
    t = torch.randn(1, 3, 5, 4)
    for size in ((10, 8), (13, 9), (5, 4)):
        assert torch.equal(nearest_up(t, size), upsample_nearest(t, size))
    parts = [torch.randn(1, 2, 3, i + 1) for i in range(23)]
    concat_inputs = []
    original = torch.cat

    def counting_cat(tensors, dim):
        concat_inputs.append(len(tensors))
        return original(tensors, dim)
    torch.cat = counting_cat
    try:
        out = tree_cat(parts, -1)
    finally:
        torch.cat = original
    assert torch.equal(out, original(parts, -1)) and max(concat_inputs) <= 10


@pytest.mark.parametrize('name, match', [
    ('dfmnlp', 'deformable embedding'), ('nlp_headfix2', 'dynamic convolutions')])
def test_layers_without_an_exact_export_form_say_why(name, match):
    pool = create_pool2d(name, 8, 2, dynamic=name == 'nlp_headfix2')
    with pytest.raises(ExportError, match=match):
        pool.export_form((16, 16))
    with pytest.raises(ExportError, match='ceil-mode'):
        create_pool2d('lip', 8, 2, ceil_mode=True).export_form((15, 15))


def test_exported_ops_are_what_the_memory_count_sees():
    """The Gaussian pool's window deviations are gathered by two TRANSPOSEs and normalised by one
    L2_NORMALIZATION (all int8): the tflm accounting counts those ops, not the ones PyTorch traces them as."""
    from timm_nlp.profiler import tflm_profile
    pool = create_pool2d('gaussian_pool', 8, 2).eval()
    form = pool.export_form((12, 10))
    assert [type(m).__name__ for m in form.modules() if isinstance(m, ExportedOps)] == ['WindowsLast', 'L2Normalize']
    steps = [(layer.kind, layer.out_bytes) for layer in tflm_profile(form, (8, 12, 10)).layers]
    window_ops = [step for step in steps if step[0] in ('transpose', 'l2_normalization')]
    assert window_ops == [('transpose', 8 * 12 * 10)] * 2 + [('l2_normalization', 8 * 12 * 10)]
    assert not {'rsqrt', 'sqrt', 'sum'} & {op for op, _ in steps}
    windows = WindowsLast()(torch.arange(2 * 4 * 6.).reshape(1, 2, 4, 6), 2, 3)
    assert windows.shape == (4, 2, 6) and windows[1, 0].tolist() == [3, 4, 5, 9, 10, 11]  # window (0, 1), channel 0
