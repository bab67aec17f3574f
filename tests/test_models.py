"""Pooled backbones: every registered name, stride semantics, dynamic conv, pre-pool, stock-weight transfer."""
import math

import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import timm_nlp
from reference import pooling_reaches_logits, randomize_model, randomize_norms
from timm_nlp.grammar import ArchSpec
from timm_nlp.layers import (
    DeformConv2d, DynamicConv2d, WeightedPool2d, WindowAvgPool2d, convert_dynamic_conv, set_dynamic_temperature)
from timm_nlp.models import (
    PAPER_EXAMPLES, adapt_stock_state_dict, checkpoint_filter_fn, list_pooled_models, load_stock_weights)

FAMILIES = {'resnet': 'resnet', 'resnetv2': 'resnetv2', 'mobilenetv2': 'efficientnet'}


def _cheap_build(name: str) -> nn.Module:
    """Build on the meta device, then materialise with constant weights (zeros; ones for BN variance and the
    dynamic-conv temperature). Shapes and kernels are real; it skips the random init that makes building
    all 418 models slow (dynamic ResNet-50 has 94M parameters)."""
    model = timm.create_model(name, device='meta').to_empty(device='cpu')
    with torch.no_grad():
        for key, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.fill_(1. if key.endswith(('running_var', 'temperature')) else 0.)
    return model.eval()


def _expected_reductions(arch: ArchSpec):
    if arch.spec.family == 'efficientnet':
        n = len(arch.strides)
        return [arch.reductions[i + 1] for i in range(n) if i == n - 1 or arch.strides[i + 1] > 1]
    return [1 if arch.prepool is not None else 2] + list(arch.reductions[1:])


@pytest.mark.slow
@pytest.mark.parametrize('family', list(FAMILIES))
def test_every_registered_name_builds_and_follows_its_strides(family):
    names = [n for n in list_pooled_models() if _family(n) == family]
    assert len(names) >= 80
    H, W = 40, 56
    x = torch.randn(1, 3, H, W)
    for name in names:
        model = _cheap_build(name)
        arch = model.arch
        if name.endswith('_pooled'):
            assert arch == ArchSpec(arch.backbone, 'skip', arch.spec.stock, name.startswith('dy'))
        else:
            assert ArchSpec.parse(name) == arch
        reductions = [f['reduction'] for f in model.feature_info]
        assert reductions == _expected_reductions(arch), name
        with torch.no_grad():
            final, feats = model.forward_intermediates(x)
            logits = model.forward_head(final)
        assert logits.shape == (1, 1000), name
        assert len(feats) == len(reductions), name
        for f, r, info in zip(feats, reductions, model.feature_info):
            assert f.shape[1:] == (info['num_chs'], math.ceil(H / r), math.ceil(W / r)), (name, r, f.shape)
        out = arch.output_size(224)
        assert model.pretrained_cfg['pool_size'] == (out, out), name


def _family(name: str) -> str:
    module = timm.models.get_pretrained_cfg(name) and timm.models._registry._model_to_module[name]
    return {v: k for k, v in FAMILIES.items()}[module]


def test_resnet18_4222_reductions():
    model = timm.create_model('resnet18_nlp_headfix2_4222')
    assert model.feature_info[0]['reduction'] == 2
    assert [f['reduction'] for f in model.feature_info] == [2, 16, 32, 64, 128]
    feats = timm.create_model('resnet18_nlp_headfix2_4222', features_only=True, out_indices=(1, 3)).eval()
    assert feats.feature_info.reduction() == [16, 64]
    with torch.no_grad():
        outs = feats(torch.randn(2, 3, 128, 128))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 8, 8), (2, 256, 2, 2)]


@pytest.mark.parametrize('seed', PAPER_EXAMPLES)
def test_paper_examples_are_registered_and_build(seed):
    spec = ArchSpec.from_seed(seed)
    assert timm.is_model(seed) and timm.is_model(spec.timm_name)
    a = timm.create_model(seed, device='meta')
    b = timm_nlp.create_model(spec.seed, device='meta')
    assert a.arch == b.arch == spec
    sa, sb = a.state_dict(), b.state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in sb.items()}


def test_create_model_any_string():
    model = timm_nlp.create_model('resnet18-lip-1144')  # not registered: generic entrypoint
    assert model.arch == ArchSpec('resnet18', 'lip', (1, 1, 4, 4))
    assert model.pretrained_cfg['pool_size'] == (4, 4) and model.pretrained_cfg['architecture'] == 'resnet18_pooled'
    assert timm_nlp.create_model('RESNET18-NLP_HEADFIX2-1222').pretrained_cfg['architecture'] == \
        'resnet18_nlp_headfix2_1222'
    model = timm.create_model('resnetv2_18_pooled', pool='nlp_reduced', strides=2222, prepool='maxp', prepool_stride=2)
    assert model.arch.seed == 'prepool-maxp-2-resnet18_v2-nlp_reduced-2222'
    with pytest.raises(ValueError, match="Unknown backbone 'vgg16'"):
        timm_nlp.create_model('vgg16-nlp-12222')
    with pytest.raises(ValueError, match=r"Invalid stride digits '12'"):
        timm.create_model('resnet18_pooled', strides='12')
    with pytest.raises(ValueError, match=r'needs both prepool and prepool_stride \(got prepool=None, prepool_stride=8'):
        timm.create_model('resnet18_pooled', prepool_stride=8)
    assert timm.create_model('resnet18_pooled', prepool='maxp').arch.prepool_stride == 4


def test_dynamic_conv_k1_is_plain_conv():
    torch.manual_seed(0)
    for groups, bias, stride in ((1, True, 1), (4, False, 2), (8, True, 3)):
        dyn = DynamicConv2d(8, 16 if groups != 8 else 8, 3, stride, 1, groups=groups, bias=bias, num_kernels=1)
        conv = nn.Conv2d(8, dyn.out_channels, 3, stride, 1, groups=groups, bias=bias)
        with torch.no_grad():
            conv.weight.copy_(dyn.kernels[0])
            if bias:
                conv.bias.copy_(dyn.bias[0])
        x = torch.randn(3, 8, 11, 9, requires_grad=True)
        y = dyn(x)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        gx_dyn, = torch.autograd.grad(y, x, g)
        gx_conv, = torch.autograd.grad(conv(x), x, g)
        torch.testing.assert_close(gx_dyn, gx_conv, atol=1e-5, rtol=1e-5)


def test_dynamic_conv_mixes_kernels_per_sample():
    torch.manual_seed(0)
    dyn = DynamicConv2d(4, 6, 3, 1, 1, num_kernels=3, temperature=1.)
    x = torch.randn(2, 4, 7, 7)
    attn = dyn.attention(x)
    assert attn.shape == (2, 3) and torch.allclose(attn.sum(1), torch.ones(2))
    for b in range(2):  # sample b uses its own kernel sum_k attn[b, k] W_k
        w = (attn[b, :, None, None, None, None] * dyn.kernels).sum(0)
        bias = (attn[b, :, None] * dyn.bias).sum(0)
        ref = nn.functional.conv2d(x[b:b + 1], w, bias, padding=1)
        torch.testing.assert_close(dyn(x)[b:b + 1], ref, atol=1e-5, rtol=1e-5)
    hot = DynamicConv2d(4, 6, 3, 1, 1, num_kernels=3, temperature=30.)
    hot.load_state_dict({**dyn.state_dict(), 'temperature': torch.tensor(30.)})
    assert (hot.attention(x) - 1 / 3).abs().max() < (attn - 1 / 3).abs().max()


@pytest.mark.parametrize('temperature', [0., -1., math.inf, math.nan])
def test_dynamic_conv_refuses_a_temperature_that_is_not_positive(temperature):
    # 0 gave NaN outputs, a negative one silently inverted the kernel attention
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'):
        DynamicConv2d(4, 4, 3, padding=1, temperature=temperature)
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'):
        timm.create_model('dyresnet18_skip_1222', dynamic_temperature=temperature)
    model = timm.create_model('dyresnet18_skip_1222')
    with pytest.raises(ValueError, match='temperature must be a finite number > 0'):
        set_dynamic_temperature(model, temperature)
    assert all(m.temperature.item() == 30. for m in model.modules() if isinstance(m, DynamicConv2d))


@pytest.mark.parametrize('groups,bias,stride', [(1, True, 1), (2, False, 2), (4, True, 1)])
def test_dynamic_conv_batch_agnostic_form_is_the_same_function(groups, bias, stride):
    torch.manual_seed(0)
    dyn = DynamicConv2d(8, 12, 3, stride, 1, groups=groups, bias=bias, num_kernels=3, temperature=1.).double()
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


def test_dynamic_variant_converts_every_1x1_and_3x3_conv():
    stock = timm.create_model('resnet18')
    n_convs = sum(1 for m in stock.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] in (1, 3))
    model = timm.create_model('dyresnet18_nlp_2222')
    assert sum(isinstance(m, DynamicConv2d) for m in model.modules()) == n_convs + 1  # + new layer1 shortcut
    assert type(model.conv1) is nn.Conv2d  # the 7x7 stem stays static
    for pool in (m for m in model.modules() if isinstance(m, WeightedPool2d)):
        assert not any(isinstance(m, DynamicConv2d) for m in pool.modules())  # pooling layers stay static
    assert convert_dynamic_conv(nn.Sequential(nn.Conv2d(3, 3, 5))) == []
    # DynamicConv2d takes one stride, padding and dilation for both axes: other convs keep their geometry
    mixed = nn.Sequential(*[nn.Conv2d(3, 3, 3, **kw) for kw in (
        dict(stride=(1, 2)), dict(padding=(1, 0)), dict(dilation=(2, 1)), dict(stride=2, padding=1, dilation=2))])
    assert convert_dynamic_conv(mixed) == ['3'] and mixed[3].stride == (2, 2) and mixed[3].dilation == (2, 2)


@pytest.mark.parametrize('name,base', [
    ('resnet18_skip_1222', 'resnet18'), ('resnetv2_18_skip_1222', 'resnetv2_18'),
    ('mobilenetv2_skip_1222121', 'mobilenetv2_100'), ('dyresnet18_skip_1222', 'resnet18'),
    ('dymobilenetv2_skip_1222121', 'mobilenetv2_100'), ('dyresnetv2_18_skip_1222', 'resnetv2_18'),
])
def test_stock_strides_with_skip_reproduce_the_stock_model(name, base):
    torch.manual_seed(0)
    stock = timm.create_model(base).eval()
    randomize_norms(stock)  # a non-zero last BN in every block: the block convs reach the logits
    model = timm.create_model(name).eval()
    report = load_stock_weights(model, stock.state_dict())
    assert not report.unused and not report.mismatched
    if name.startswith('dy'):
        assert report.expanded and all(k.endswith('weight') for k in report.expanded)
        assert all(k.rsplit('.', 2)[-2] in ('fc1', 'fc2') or k.endswith('temperature') for k in report.new)
    else:
        assert not report.new and not report.expanded
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name,expected', [
    ('resnet18_nlp_headfix2_1222', ['layer2.0.aa', 'layer3.0.aa', 'layer4.0.aa']),
    ('resnet18_lip_2222', ['layer1.0.aa', 'layer1.0.downsample', 'layer2.0.aa', 'layer3.0.aa', 'layer4.0.aa']),
    ('resnet50_mixp_4222', ['layer1.0.aa', 'layer2.0.aa', 'layer3.0.aa', 'layer4.0.aa']),
    ('resnetv2_18_gaussian_pool_1222', ['stages.1.blocks.0.aa', 'stages.2.blocks.0.aa', 'stages.3.blocks.0.aa']),
    ('resnetv2_18_nlp_4222', ['stages.0.blocks.0.aa', 'stages.0.blocks.0.downsample', 'stages.1.blocks.0.aa',
                              'stages.2.blocks.0.aa', 'stages.3.blocks.0.aa']),
    ('mobilenetv2_dfmnlp_2222121', [f'blocks.{i}.0.aa' for i in (0, 1, 2, 3, 5)]),
    ('prepool-lip-8-resnet18-skip-1222', ['maxpool']),
    ('resnet18_skip_4222', ['layer1.0.downsample']),
])
def test_weight_transfer_reports_exactly_the_new_modules(name, expected):
    model = timm.create_model(name)
    stock = timm.create_model(model.arch.base_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_stock_weights(model, stock.state_dict())
    assert report.new_modules == expected
    assert not report.unused and not report.mismatched and not report.expanded
    after = model.state_dict()
    for key in report.new:
        assert torch.equal(after[key], before[key]), f'{key} changed'
    for key in report.loaded:
        assert torch.equal(after[key], stock.state_dict()[key]), f'{key} not loaded'


def test_transfer_rejects_another_architecture():
    model = timm.create_model('resnet18_nlp_1222')
    with pytest.raises(ValueError, match=r"match resnet18-nlp-1222; 23 shape mismatches, 198 unexpected tensors: "
                       r"layer1.0.conv1.weight checkpoint \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\).* and 213 more"):
        load_stock_weights(model, timm.create_model('resnet50').state_dict())
    _, report = adapt_stock_state_dict(timm.create_model('mobilenetv2_100').state_dict(), model)
    assert report.loaded == ['bn1.num_batches_tracked'] and len(report.unused) > 100 and report.mismatched
    with pytest.raises(ValueError, match=r'bn1.weight checkpoint \(32,\) vs model \(64,\)'):
        load_stock_weights(model, timm.create_model('mobilenetv2_100').state_dict())
    # another backbone whose tensors share no name with the model: nothing would load
    with pytest.raises(ValueError, match=r'0 shape mismatches, \d+ unexpected tensors: unexpected stem.conv.weight'):
        load_stock_weights(model, timm.create_model('resnetv2_18').state_dict())


@pytest.mark.parametrize('name,stem,kernels', [('resnet18_lip_2222', 'conv1', 1),
                                               ('dymobilenetv2_lip_2222121', 'conv_stem', 4)])
def test_stock_weights_adapt_the_stem_to_in_chans(name, stem, kernels):
    # as timm's pretrained loading does for in_chans != 3: the RGB stem summed over its input channels (then tiled
    # over the kernels of a dynamic stem); every other stock tensor loads unchanged
    model = timm.create_model(name, in_chans=1)
    stock = timm.create_model(model.arch.base_name).state_dict()
    report = load_stock_weights(model, stock)
    rgb = stock[stem + '.weight']
    expect = rgb.sum(1, keepdim=True).repeat(kernels, 1, 1, 1)
    assert torch.equal(model.state_dict()[stem + '.weight'], expect)
    assert stem + '.weight' in (report.loaded if kernels == 1 else report.expanded) and not report.mismatched


def test_checkpoint_filter_names_missing_tensors():
    # weights of another architecture for a model of another class count, which timm then loads with strict=False:
    # the tensors the checkpoint lacks (the lip layers, the new shortcut) must be an error, not stay at their init
    model = timm.create_model('resnet18_lip_2222', num_classes=5)
    with pytest.raises(ValueError, match=r'match resnet18-lip-2222: missing layer1\.0\.'):
        checkpoint_filter_fn(timm.create_model('resnet18_skip_1222').state_dict(), model)
    same = timm.create_model('resnet18_lip_2222').state_dict()
    assert checkpoint_filter_fn(same, model).keys() == same.keys() - {'fc.weight', 'fc.bias'}
    # what torch's strict loading accepts passes: no BN counters; a model without a head (num_classes=0)
    counters = {k for k in same if k.endswith('num_batches_tracked')}
    assert counters and checkpoint_filter_fn({k: v for k, v in same.items() if k not in counters}, model).keys() == \
        same.keys() - counters - {'fc.weight', 'fc.bias'}
    headless = timm.create_model('resnet18_lip_2222', num_classes=0)
    assert checkpoint_filter_fn(same, headless).keys() == same.keys() - {'fc.weight', 'fc.bias'}


def test_checkpoint_filter_adapts_a_dynamic_stem_to_in_chans():
    # the routing layer of a dynamic stem reads the input's channel means: RGB summed for one channel, like the conv
    # (whose weight timm adapts after the filter)
    rgb = timm.create_model('dymobilenetv2_lip_2222121').state_dict()
    out = checkpoint_filter_fn(rgb, timm.create_model('dymobilenetv2_lip_2222121', in_chans=1))
    torch.testing.assert_close(out['conv_stem.fc1.weight'], rgb['conv_stem.fc1.weight'].sum(1, keepdim=True))
    assert torch.equal(out['conv_stem.weight'], rgb['conv_stem.weight'])


def test_prepool_replaces_the_stem_downsampling():
    model = timm.create_model('prepool-lip-8-resnet18-skip-1222').eval()
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, WeightedPool2d) and model.maxpool.stride == 8
    sizes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-2:]))
             for n in ('act1', 'maxpool', 'layer1')]
    with torch.no_grad():
        model(torch.randn(1, 3, 60, 44))
    assert sizes == {'act1': (60, 44), 'maxpool': (8, 6), 'layer1': (8, 6)}
    for h in hooks:
        h.remove()
    # reduced pre-pool: patch size = its stride; MobileNetV2's stem norm-act is followed by the pre-pool
    model = timm_nlp.create_model('prepool-nlp_reduced-4-mobilenet_v2-skip-1222121').eval()
    assert model.conv_stem.stride == (1, 1) and model.bn1[1].nlp.patch_size == 4
    with torch.no_grad():
        assert model.bn1(model.conv_stem(torch.randn(1, 3, 30, 30))).shape[-2:] == (8, 8)
    model = timm_nlp.create_model('prepool-avgp-2-resnet50_v2-skip-1222')
    assert model.stem.conv.stride == (1, 1) and isinstance(model.stem.pool, WindowAvgPool2d)


def test_resnet_stem_options():
    # a deep stem (three 3x3 convs): the pre-pool takes the stem's width and the first conv's stride
    model = timm_nlp.create_model('prepool-lip-4-resnet18-skip-1222', stem_type='deep').eval()
    assert model.conv1[0].stride == (1, 1) and model.maxpool.channels == model.bn1.num_features == 128
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 36, 36)).shape == (1, 512, 2, 2)  # 36 / 4 / 8, rounded up
    with pytest.raises(ValueError, match='avg_down=True is not supported by pooled ResNets'):
        timm.create_model('resnet50_skip_2222', avg_down=True)


def test_resnetv2_stem_and_shortcut_options():
    # a deep pre-activation stem: conv1 is the strided conv, conv3 gives the pre-pool its width
    model = timm_nlp.create_model('prepool-lip-4-resnet50_v2-skip-1222', stem_type='deep').eval()
    assert model.stem.conv1.stride == (1, 1) and model.stem.pool.channels == model.stem.conv3.out_channels == 64
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 36, 36)).shape == (1, 2048, 2, 2)
    with pytest.raises(ValueError, match="stem_type='fixed' cannot take a pre-pool"):
        timm_nlp.create_model('prepool-lip-4-resnet18_v2-skip-1222', stem_type='fixed')
    for name in ('resnetv2_18_skip_2222', 'resnetv2_18_lip_2222'):
        with pytest.raises(ValueError, match='avg_down=True is not supported by pooled ResNetV2s'):
            timm.create_model(name, avg_down=True)


def test_pooling_placement_and_strides():
    model = timm.create_model('resnet50_nlp_headfix2_4222')
    blk = model.layer1[0]
    assert blk.conv2.stride == (1, 1) and blk.aa.stride == 4 and blk.aa.channels == 64
    assert blk.downsample[0].stride == (4, 4) and blk.aa.nlp.attn.num_heads == 2
    model = timm.create_model('resnet18_skip_4222')
    assert model.layer1[0].conv1.stride == (4, 4) and isinstance(model.layer1[0].aa, nn.Identity)
    model = timm.create_model('resnet18_nlp_reduced_1222')
    assert [model.get_submodule(f'layer{i}.0.aa').nlp.patch_size for i in (2, 3, 4)] == [8, 4, 2]
    model = timm.create_model('mobilenetv2_lip_4222121')
    assert model.blocks[0][0].conv_dw.stride == (1, 1) and model.blocks[0][0].aa.stride == 4
    assert model.blocks[4][0].conv_dw.stride == (1, 1) and isinstance(model.blocks[4][0].aa, nn.Identity)


def test_torchscript_and_fx_match_eager():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    for name in ('resnet18_mixp_2222', 'dymobilenetv2_dfmnlp_2222121', 'resnetv2_18_gaussian_pool_4222',
                 'resnet18_nlp_headfix2_nowin_reduced_1222'):
        with timm.layers.set_layer_config(scriptable=True):
            model = timm.create_model(name).eval()
        randomize_model(model)
        assert pooling_reaches_logits(model, x)
        feats = timm.models.FeatureGraphNet(model, out_indices=tuple(range(len(model.feature_info)))).eval()
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(model)(x), model(x), atol=1e-4, rtol=1e-4)
            outs, ref = feats(x), model.forward_intermediates(x, intermediates_only=True)
        assert len(outs) == len(ref) == len(model.feature_info)
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name', ['resnet18_dfmnlp_2222', 'resnetv2_18_dfmixp_2222', 'mobilenetv2_dfmnlp_1222121',
                                  'dyresnet50_dfmixp_1222'])
def test_deformable_offsets_start_at_zero_in_models(name):
    # the backbone's weight init draws every nn.Conv2d, the offset branch included; a deformable patch embedding
    # must still start as the regular convolution of its weight
    model = timm.create_model(name)
    deform = [m for m in model.modules() if isinstance(m, DeformConv2d)]
    assert deform
    for m in deform:
        assert m.offset.weight.abs().max() == 0 and m.offset.bias.abs().max() == 0
    m = deform[0]
    x = torch.randn(1, m.weight.shape[1], 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, m.stride, m.padding), atol=1e-5, rtol=1e-5)


def test_nan_input_does_not_crash_deformable_pooling():
    model = timm.create_model('resnet18_dfmnlp_2222').eval()
    x = torch.full((1, 3, 32, 32), float('nan'))
    with torch.no_grad():
        assert torch.isnan(model(x)).all()


@pytest.mark.parametrize('name', ['dyresnet18_lip_2222', 'dymobilenetv2_dfmixp_2222121', 'dyresnetv2_18_nlp_4222',
                                  'resnet18_nlp_headfix2_nowin_reduced_1222'])
def test_channels_last_model_matches_contiguous(name):
    """``model.to(memory_format=torch.channels_last)`` (timm train.py's --channels-last) converts every module,
    the dynamic convolutions' stacked kernels included, and computes the same function, forward and backward. fp64:
    in fp32 the train-mode gradients of a random-init MobileNetV2 differ by 0.5% between layouts (stock timm too)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train().double()
    randomize_norms(model)  # timm's zero last BN of each block would cut the pooling layers off the output
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()), allow_unused=True)
    pool_params = {id(p) for m in model.modules() if isinstance(m, WeightedPool2d) for p in m.parameters()}
    assert pool_params and all(g is not None and g.abs().max() > 0 for p, g in zip(model.parameters(), grads)
                               if id(p) in pool_params)
    model = model.to(memory_format=torch.channels_last)
    dyn = [m.weight for m in model.modules() if isinstance(m, DynamicConv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in dyn) and (name.startswith('dy') or not dyn)
    y_cl = model(x.to(memory_format=torch.channels_last))
    assert (y_cl - y).abs().max() <= 1e-10 * y.abs().max()
    grads_cl = torch.autograd.grad(y_cl.square().sum(), list(model.parameters()), allow_unused=True)
    scale = max(g.abs().max().item() for g in grads if g is not None)
    for g, g_cl in zip(grads, grads_cl):
        assert (g is None) == (g_cl is None)
        if g is not None:
            assert (g - g_cl).abs().max() <= 1e-10 * scale


def test_mobilenetv2_features_only_matches_stock_and_takes_any_level_count():
    # the same module names as timm's EfficientNetFeatures: feature checkpoints load both ways, same outputs
    stock = timm.create_model('mobilenetv2_100', features_only=True).eval()
    randomize_norms(stock)
    model = timm.create_model('mobilenetv2_skip_1222121', features_only=True).eval()
    model.load_state_dict(stock.state_dict())
    stock.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        for a, b in zip(model(x), stock(x), strict=True):
            torch.testing.assert_close(a, b)
    # 1122121 down-samples in four places: four levels by default, at the reductions they report
    model = timm_nlp.create_model('mobilenet_v2-lip-1122121', features_only=True).eval()
    with torch.no_grad():
        feats = model(x)
    assert model.feature_info.reduction() == [2, 4, 8, 16]
    assert [(f.shape[1], f.shape[-1]) for f in feats] == [(c, -(-48 // r)) for c, r in zip(
        model.feature_info.channels(), model.feature_info.reduction())]
