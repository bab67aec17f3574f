"""Pooled backbones: every registered name, the paper's placements and strides, dynamic convs, pre-pools, options,
stock-weight transfer, scripting and memory formats."""
import pytest
import timm
import torch
from torch import nn

import timm_nlp
from reference import pooling_reaches_logits, randomize_model, randomize_norms
from timm_nlp.grammar import BACKBONES, ArchSpec
from timm_nlp.layers import (
    DeformConv2d, DynamicConv2d, GaussianPool2d, WeightedPool2d, WindowAvgPool2d, WindowMaxPool2d,
    convert_dynamic_conv)
from timm_nlp.models import (
    PAPER_EXAMPLES, adapt_stock_state_dict, checkpoint_filter_fn, list_pooled_models, load_stock_weights)

FAMILIES = ('pooled_resnet', 'pooled_mobilenetv2')


def _cheap_build(name: str, **kwargs) -> nn.Module:
    """Build on the meta device, then materialise with constant weights (zeros; ones for BN variance and the
    dynamic-conv temperature). Shapes and kernels are real; it skips the random init that makes building
    all the models slow (dynamic ResNet-50 has 170M parameters)."""
    model = timm.create_model(name, device='meta', **kwargs).to_empty(device='cpu')
    with torch.no_grad():
        for key, t in list(model.named_parameters()) + list(model.named_buffers()):
            t.fill_(1. if key.endswith(('running_var', 'temperature')) else 0.)
    return model.eval()


def _expected_features(arch: ArchSpec, H: int, W: int):
    """(reduction, height, width) of every feature level: ResNet's stem activation (stride 2, 1 under a pre-pool,
    S for prepool-skip-S) and stages; MobileNetV2's stages followed by a down-sampling stage, and the last."""
    hs, ws = arch.output_sizes(H), arch.output_sizes(W)
    n = len(arch.strides)
    if arch.spec.family == 'mobilenetv2':
        return [(arch.reductions[i + 1], hs[i + 1], ws[i + 1]) for i in range(n)
                if i == n - 1 or arch.strides[i + 1] > 1]
    stem = 2 if arch.prepool is None else arch.prepool_stride if arch.prepool.method == 'skip' else 1
    return [(stem, -(-H // stem), -(-W // stem))] + [(arch.reductions[i + 1], hs[i + 1], ws[i + 1]) for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES)
def test_every_registered_name_builds_and_follows_its_strides(family):
    names = [n for n in list_pooled_models() if timm.models._registry._model_to_module[n] == family]
    assert len(names) >= 150
    H, W = 40, 56
    x = torch.randn(1, 3, H, W)
    for name in names:
        model = _cheap_build(name)
        arch = model.arch
        if name.endswith('_pooled'):
            assert arch == ArchSpec(arch.backbone, 'skip', arch.spec.stock_strides, name.startswith('dy'))
        else:
            assert ArchSpec.parse(name) == arch
        expected = _expected_features(arch, H, W)
        assert [f['reduction'] for f in model.feature_info] == [r for r, _, _ in expected], name
        with torch.no_grad():
            final, feats = model.forward_intermediates(x)
            logits = model.forward_head(final)
        assert logits.shape == (1, 1000), name
        assert [tuple(f.shape[1:]) for f in feats] == [
            (info['num_chs'], h, w) for info, (_, h, w) in zip(model.feature_info, expected)], name
        out = arch.output_size(224)
        assert model.pretrained_cfg['pool_size'] == (out, out), name


def test_registry_holds_timm_names_only():
    names = list_pooled_models()
    grid = len(BACKBONES) * 2 * (13 * 3 + 1)  # the grid and one generic entrypoint per backbone, with dy variants
    extra = {ArchSpec.from_seed(s).timm_name for s in PAPER_EXAMPLES} - {
        s.timm_name for b in BACKBONES for dy in (False, True) for s in timm_nlp.models.grid_specs(b, dy)}
    assert len(extra) == 5 and len(names) == grid + len(extra) and len(timm.list_models('*nlp*')) >= 216
    assert all(n == n.lower() and '-' not in n for n in names)
    assert not timm.list_models('resnetv2*_nlp*') and not timm.is_model('resnet18-nlp-1222')


@pytest.mark.parametrize('seed', PAPER_EXAMPLES)
def test_paper_examples_are_registered_and_build(seed):
    spec = ArchSpec.from_seed(seed)
    assert timm.is_model(spec.timm_name)
    a = timm.create_model(spec.timm_name, device='meta')
    b = timm_nlp.create_model(seed.upper(), device='meta')
    assert a.arch == b.arch == spec
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_create_model_any_string():
    model = timm_nlp.create_model('resnet18-lip-1144')  # not registered: generic entrypoint
    assert model.arch == ArchSpec('resnet18', 'lip', (1, 1, 4, 4))
    assert model.pretrained_cfg['pool_size'] == (3, 3) and model.pretrained_cfg['architecture'] == 'resnet18_pooled'
    assert timm_nlp.create_model('RESNET18-NLP_HEADFIX2-1222').pretrained_cfg['architecture'] == \
        'resnet18_nlp_headfix2_1222'
    model = timm.create_model('resnet18b1_pooled', pool='nlp_reduced', strides=2222, prepool='maxp', prepool_stride=2)
    assert model.arch.seed == 'prepool-maxp-2-resnet18_v2-nlp_reduced-2222'
    with pytest.raises(ValueError, match="Unknown backbone 'vgg16'"):
        timm_nlp.create_model('vgg16-nlp-12222')
    with pytest.raises(ValueError, match=r"Invalid stride digits '12'"):
        timm.create_model('resnet18_pooled', strides='12')
    with pytest.raises(ValueError, match=r'needs both prepool and prepool_stride \(got prepool=None, prepool_stride=8'):
        timm.create_model('resnet18_pooled', prepool_stride=8)
    assert timm.create_model('resnet18_pooled', prepool='maxp').arch.prepool_stride == 4


def _child_names(stage: nn.Module):
    return [n for n, _ in stage.named_children()]


def test_pools_sit_where_the_paper_code_puts_them():
    # resnet18: after the stage's last block, the whole stage at stride 1, a shortcut only where channels change
    model = timm.create_model('resnet50_nlp_headfix2_4222')
    assert _child_names(model.layer1) == ['0', '1', '2', 'pool'] and model.layer1.pool.stride == 4
    assert model.layer1[0].conv2.stride == (1, 1) and model.layer1[0].downsample[0].stride == (1, 1)
    assert model.layer1.pool.channels == 256 and model.layer1.pool.non_local.attn.num_heads == 2
    model = timm.create_model('resnet18_lip_2222')
    assert model.layer1[0].downsample is None and model.layer2[0].downsample[0].stride == (1, 1)
    # _v2: on the first block's output; the paper's code keeps the projection its nominal stride makes, at stride 1
    model = timm.create_model('resnet18b1_lip_4222')
    assert _child_names(model.layer1) == ['0', 'pool', '1'] and model.layer1.pool.channels == 64
    assert model.layer1[0].downsample[0].stride == (1, 1) and model.layer1[0].conv1.stride == (1, 1)
    # skip: the first block's strided 3x3 conv and a strided shortcut (torchvision's rule), stage 1 included
    model = timm.create_model('resnet18_skip_4222')
    assert model.layer1[0].conv1.stride == (4, 4) and model.layer1[0].downsample[0].stride == (4, 4)
    assert model.layer1[0].downsample[0].padding == (0, 0) and _child_names(model.layer1) == ['0', '1']
    assert isinstance(model.maxpool, WindowMaxPool2d) and model.maxpool.stride == 2  # the paper's stem: kernel 2
    # heads by stage index, reduced patch sizes by stage
    model = timm.create_model('resnet18_nlp_reduced_2222')
    assert [model.get_submodule(f'layer{i}.pool').non_local.patch_size for i in (1, 2, 3, 4)] == [4, 2, 1, 1]
    assert [model.get_submodule(f'layer{i}.pool').non_local.attn.num_heads for i in (1, 2, 3, 4)] == [4, 8, 16, 32]
    # mobilenet_v2: on the first block's output; mobilenet: before the first block, on the stage input
    model = timm.create_model('mobilenetv2_lip_4222121')
    assert _child_names(model.blocks[0]) == ['0', 'pool'] and model.blocks[0][0].conv_dw.stride == (1, 1)
    assert model.blocks[0].pool.channels == 16 and model.blocks[1].pool.channels == 24
    assert _child_names(model.blocks[4]) == ['0', '1', '2'] and model.blocks[4][0].conv_dw.stride == (1, 1)
    model = timm.create_model('mobilenetv2b0_nlp_2222121')
    assert _child_names(model.blocks[1]) == ['pool', '0', '1'] and model.blocks[1].pool.channels == 16
    assert model.blocks[0].pool.channels == 32 and model.blocks[5].pool.non_local.attn.num_heads == 64
    assert model.blocks[5].pool.non_local.embed_dim == 128  # 96 channels, 64 heads: round(1.5) = 2 per head
    model = timm.create_model('mobilenetv2_skip_4222121')
    assert model.blocks[0][0].conv_dw.stride == (4, 4) and not hasattr(model.blocks[0], 'pool')


def test_in_block_placement_is_an_option():
    """placement='block': the pool in the first block's aa slot after its strided conv's norm-act, ceil mode, the
    shortcut strided past it; not a network of the paper, smaller and cheaper than the paper's placement."""
    from timm_nlp.profiler import count_macs
    model = timm.create_model('resnet18_nlp_headfix2_2222', placement='block').eval()
    blk = model.layer1[0]
    assert isinstance(blk.aa, WeightedPool2d) and blk.aa.ceil_mode and blk.conv1.stride == (1, 1)
    assert blk.downsample[0].stride == (2, 2) and not hasattr(model.layer1, 'pool')
    paper = timm.create_model('resnet18_nlp_headfix2_2222').eval()
    assert count_macs(model, (3, 64, 64)) < count_macs(paper, (3, 64, 64))
    assert model(torch.randn(1, 3, 70, 70)).shape == (1, 1000)
    assert timm.create_model('mobilenetv2b0_lip_2222121', placement='block').blocks[1][0].aa.channels == 96
    with pytest.raises(ValueError, match="placement='inside' is not one of 'paper', 'block'"):
        timm.create_model('resnet18_lip_2222', placement='inside')


def test_dynamic_variant_converts_every_conv_the_paper_code_does():
    stock = timm.create_model('resnet18')
    n_convs = sum(1 for m in stock.modules() if isinstance(m, nn.Conv2d))
    model = timm.create_model('dyresnet18_nlp_2222')
    backbone = [n for n, m in model.named_modules() if isinstance(m, DynamicConv2d) and '.pool.' not in n]
    assert len(backbone) == n_convs  # the stem, the blocks, the shortcuts of stages 2-4 (at stride 1)
    assert isinstance(model.conv1, DynamicConv2d) and model.conv1.kernel_size == (7, 7)
    assert not any(type(m) is nn.Conv2d for m in model.modules())  # the pools' embed and restore convs too
    assert isinstance(model.fc, nn.Linear)
    model = timm.create_model('dymobilenetv2_dfmixp_2222121')
    assert all(not isinstance(m, nn.Conv2d) for m in model.modules())
    assert isinstance(model.blocks[1][0].conv_dw, DynamicConv2d) and model.blocks[1][0].conv_dw.groups == 96
    assert isinstance(model.blocks[0].pool.non_local.patch_embed.conv, DynamicConv2d)
    assert isinstance(model.blocks[0].pool.local.conv, DynamicConv2d)
    # LIP's and Gaussian pooling's convs stay static, as in the paper's code
    for name in ('dyresnet18_lip_2222', 'dyresnet18_gaussian_pool_2222'):
        pools = [m for m in timm.create_model(name).modules() if isinstance(m, (WeightedPool2d, GaussianPool2d))]
        assert pools and not any(isinstance(m, DynamicConv2d) for p in pools for m in p.modules())
    assert all(m.temperature.item() == 34 for m in model.modules() if isinstance(m, DynamicConv2d))
    # DynamicConv2d takes one stride, padding and dilation for both axes: other convs keep their geometry
    mixed = nn.Sequential(*[nn.Conv2d(3, 3, 3, **kw) for kw in (
        dict(stride=(1, 2)), dict(padding=(1, 0)), dict(dilation=(2, 1)), dict(stride=2, padding=1, dilation=2))])
    assert convert_dynamic_conv(mixed) == ['3'] and mixed[3].stride == (2, 2) and mixed[3].dilation == (2, 2)


def test_prepool_replaces_the_stem_downsampling():
    model = timm_nlp.create_model('prepool-lip-8-resnet18-skip-1222').eval()
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, WeightedPool2d) and model.maxpool.stride == 8
    sizes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[-2:]))
             for n in ('act1', 'maxpool', 'layer1')]
    with torch.no_grad():
        model(torch.randn(1, 3, 60, 44))
    assert sizes == {'act1': (60, 44), 'maxpool': (7, 5), 'layer1': (7, 5)}
    for h in hooks:
        h.remove()
    # prepool-skip-S: the stem conv takes S, no pool (the paper's ResNet ignores S there)
    model = timm_nlp.create_model('prepool-skip-4-resnet18-lip-1222')
    assert model.conv1.stride == (4, 4) and isinstance(model.maxpool, nn.Identity)
    # pre-pool defaults: p 2, 8 heads; reduced: p = S, ratio 1/4; MobileNetV2's stem norm-act is followed by it
    model = timm_nlp.create_model('prepool-nlp-6-resnet18-skip-1222')
    nl = model.maxpool.non_local
    assert (nl.patch_size, nl.attn.num_heads, nl.embed_dim) == (2, 8, 64)
    model = timm_nlp.create_model('prepool-nlp_reduced-4-mobilenet_v2-skip-1222121').eval()
    pool = model.bn1.act.pool
    assert model.conv_stem.stride == (1, 1) and (pool.non_local.patch_size, pool.non_local.embed_dim) == (4, 8)
    with torch.no_grad():
        assert model.bn1(model.conv_stem(torch.randn(1, 3, 30, 30))).shape[-2:] == (7, 7)
    model = timm_nlp.create_model('prepool-avgp-2-mobilenet-skip-1222121')
    assert isinstance(model.bn1.act.pool, WindowAvgPool2d) and 'bn1.weight' in model.state_dict()
    assert timm_nlp.create_model('prepool-skip-2-mobilenet-skip-1222121').conv_stem.stride == (2, 2)


def test_resnet_options():
    # a deep stem (three 3x3 convs): the pre-pool takes the stem's width and the first conv's stride
    model = timm_nlp.create_model('prepool-lip-4-resnet18-skip-1222', stem_type='deep').eval()
    assert model.conv1[0].stride == (1, 1) and model.maxpool.channels == model.bn1.num_features == 128
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 36, 36)).shape == (1, 512, 2, 2)  # 36 // 4 = 9, then 5, 3, 2
    for kw in (dict(avg_down=True), dict(replace_stem_pool=True), dict(aa_layer=nn.AvgPool2d)):
        with pytest.raises(ValueError, match=f'{next(iter(kw))} is not supported by the pooled ResNets'):
            timm.create_model('resnet50_skip_2222', **kw)
    with pytest.raises(ValueError, match='output_stride=16 .* is not supported'):
        timm.create_model('resnet18_lip_2222', output_stride=16)
    # timm's zero init of the last BN of each block: off as in the paper, an option
    assert timm.create_model('resnet18_skip_1222').layer1[0].bn2.weight.min() == 1
    assert timm.create_model('resnet18_skip_1222', zero_init_last=True).layer1[0].bn2.weight.abs().max() == 0


def test_paper_init():
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv2_nlp_2222121')
    assert model.classifier.bias.abs().max() == 0 and 0.008 < model.classifier.weight.std() < 0.012
    conv = getattr(model.blocks[2], '1').conv_pw  # blocks[2][1] is the stage's pool
    std = (2 / conv.out_channels) ** 0.5  # normal(0, sqrt(2 / (k * k * out)))
    assert 0.9 * std < conv.weight.std() < 1.1 * std
    nl = model.blocks[0].pool.non_local
    assert nl.attn.qkv.bias.abs().max() == 0 and nl.attn.proj.bias.abs().max() == 0
    assert nl.restore.bias.abs().max() == 0 and 0 <= nl.pos_embed.row_embed.weight.min()
    e = nl.embed_dim
    assert nl.attn.qkv.weight.abs().max() <= (6 / (4 * e)) ** 0.5  # xavier-uniform of the (3E, E) in-projection
    model = timm.create_model('resnet18_lip_2222')
    assert model.layer1[0].bn2.weight.min() == 1  # no zero init of the last BN
    conv = model.layer2[0].conv1
    std = (2 / (9 * conv.out_channels)) ** 0.5  # kaiming-normal, fan_out
    assert 0.9 * std < conv.weight.std() < 1.1 * std


@pytest.mark.parametrize('name,base', [
    ('mobilenetv2_skip_1222121', 'mobilenetv2_100'), ('dymobilenetv2_skip_1222121', 'mobilenetv2_100'),
    ('resnet18_skip_1222', 'resnet18'), ('resnet50b1_skip_1222', 'resnet50'), ('dyresnet18_skip_1222', 'resnet18'),
])
def test_stock_strides_with_skip_are_the_stock_model_but_for_the_stem_pool(name, base):
    """The paper's skip network at stock strides is the stock timm model, except that the paper's ResNet stem pools
    with kernel 2 (timm: 3, padding 1); a dynamic model with stock weights in every kernel computes the same."""
    torch.manual_seed(0)
    stock = timm.create_model(base).eval()
    randomize_norms(stock)
    if base.startswith('resnet'):
        stock.maxpool = nn.MaxPool2d(2, 2)
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
    ('resnet18_nlp_headfix2_1222', ['layer2.pool', 'layer3.pool', 'layer4.pool']),
    ('resnet18_lip_2222', ['layer1.pool', 'layer2.pool', 'layer3.pool', 'layer4.pool']),
    ('resnet18b1_mixp_4222', ['layer1.0.downsample', 'layer1.pool', 'layer2.pool', 'layer3.pool', 'layer4.pool']),
    ('mobilenetv2_dfmnlp_2222121', [f'blocks.{i}.pool' for i in (0, 1, 2, 3, 5)]),
    ('mobilenetv2b0_gaussian_pool_1222121', [f'blocks.{i}.pool' for i in (1, 2, 3, 5)]),
    ('prepool-lip-8-resnet18-skip-1222', ['maxpool']),
    ('prepool-lip-2-mobilenet_v2-skip-1222121', ['bn1.act']),  # its act is parameter-free
    ('resnet18_skip_4222', ['layer1.0.downsample']),
])
def test_weight_transfer_reports_exactly_the_new_modules(name, expected):
    model = timm_nlp.create_model(name)
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
    expect = stock[stem + '.weight'].sum(1, keepdim=True).repeat(kernels, 1, 1, 1)
    assert torch.equal(model.state_dict()[stem + '.weight'], expect)
    assert stem + '.weight' in (report.loaded if kernels == 1 else report.expanded) and not report.mismatched


def test_checkpoint_filter_names_missing_tensors():
    # weights of another architecture for a model of another class count, which timm then loads with strict=False:
    # the tensors the checkpoint lacks (the lip layers) must be an error, not stay at their init
    model = timm.create_model('resnet18_lip_2222', num_classes=5)
    with pytest.raises(ValueError, match=r'match resnet18-lip-2222: missing layer1\.pool\.'):
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


def test_group_matcher_keeps_the_pools_in_order():
    # timm's layer-wise grouping (layer decay): a stage's pool is a group of its own where it sits in the stage
    for name, stage, order in (('resnet18_lip_2222', 'layer1', ('0', '1', 'pool')),
                               ('resnet18b1_lip_2222', 'layer1', ('0', 'pool', '1')),
                               ('mobilenetv2b0_lip_2222121', 'blocks.1', ('pool', '0', '1'))):
        model = timm.create_model(name)
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=False), reverse=True)
        ids = [min(g for n, g in groups.items() if n.startswith(f'{stage}.{child}.')) for child in order]
        assert ids == sorted(set(ids)), (name, ids)


def test_torchscript_and_fx_match_eager():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    for name in ('resnet18_mixp_2222', 'dymobilenetv2_dfmnlp_2222121', 'resnet18b1_gaussian_pool_4222',
                 'resnet18_lip_2222', 'resnet18_nlp_headfix2_nowin_reduced_1222', 'mobilenetv2b0_nlp_headfix2_2222121'):
        with timm.layers.set_layer_config(scriptable=True):
            model = timm.create_model(name).eval()
        randomize_model(model)
        with torch.no_grad():
            y = model(x)
        tol = 2e-5 * max(1., y.abs().max().item())  # scripted pools take F.avg_pool2d, eager a faster equal sum
        # 10x the tolerance, in the feature maps (MobileNetV2's logits attenuate a pool's change to ~1e-4)
        assert pooling_reaches_logits(model, x, 10 * tol, output=lambda m, inp: torch.cat(
            [f.flatten() for f in m.forward_intermediates(inp, intermediates_only=True)]))
        feats = timm.models.FeatureGraphNet(model, out_indices=tuple(range(len(model.feature_info)))).eval()
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(model)(x), y, atol=tol, rtol=0)
            outs, ref = feats(x), model.forward_intermediates(x, intermediates_only=True)
        assert len(outs) == len(ref) == len(model.feature_info)
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, atol=tol, rtol=0)


@pytest.mark.parametrize('name', ['resnet18_dfmnlp_2222', 'resnet18b1_dfmixp_2222', 'mobilenetv2_dfmnlp_1222121',
                                  'dyresnet50_dfmixp_1222'])
def test_deformable_offsets_start_at_zero_in_models(name):
    # the backbone's weight init draws every convolution, the offset branch included (the paper's code keeps what
    # it draws); a deformable patch embedding must still start at the regular grid
    model = timm.create_model(name)
    deform = [m for m in model.modules() if isinstance(m, DeformConv2d)]
    assert deform
    for m in deform:
        for conv in (m.offset, m.mask):
            assert conv.weight.abs().max() == 0 and conv.bias.abs().max() == 0


def test_nan_input_does_not_crash_deformable_pooling():
    model = timm.create_model('resnet18_dfmnlp_2222').eval()
    x = torch.full((1, 3, 32, 32), float('nan'))
    with torch.no_grad():
        assert torch.isnan(model(x)).all()


@pytest.mark.parametrize('name', ['dyresnet18_lip_2222', 'dymobilenetv2_dfmixp_2222121', 'dyresnet18b1_nlp_4222',
                                  'resnet18_nlp_headfix2_nowin_reduced_1222'])
def test_channels_last_model_matches_contiguous(name):
    """``model.to(memory_format=torch.channels_last)`` (timm train.py's --channels-last) converts every module,
    the dynamic convolutions' stacked kernels included, and computes the same function, forward and backward."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train().double()
    randomize_model(model)
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
    assert [(f.shape[1], f.shape[-1]) for f in feats] == [(24, 24), (32, 12), (96, 6), (320, 3)]


def test_resnet_features_only_at_the_pooled_sizes():
    feats = timm.create_model('resnet18_nlp_headfix2_4222', features_only=True, out_indices=(1, 3)).eval()
    assert feats.feature_info.reduction() == [16, 64]
    with torch.no_grad():
        outs = feats(torch.randn(2, 3, 128, 128))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 8, 8), (2, 256, 2, 2)]
