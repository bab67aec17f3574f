"""MAC counting against closed forms; activation memory against an independent hook count; the CLI."""
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

import timm_nlp  # noqa: F401
from timm_nlp.layers import DeformConv2d, DynamicConv2d, create_pool2d
from timm_nlp.profiler import activation_profile, count_macs
from timm_nlp.tools.profile import profile_model


def test_conv_and_linear_macs():
    assert count_macs(nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 16, 16)) == 8 * 8 * 8 * 3 * 9
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2)) == 60


def test_nlp_macs_include_attention():
    C, H, W = 32, 12, 10
    N, D = H * W, 32  # p = 1, ratio 1
    expected = (C * D * N          # patch embedding
                + 3 * D * D * N    # q, k, v
                + 2 * N * N * D    # q k^T and attn v over all heads
                + D * D * N        # output projection
                + D * C * N)       # restore
    assert count_macs(create_pool2d('nlp_headfix2', C, 2), (C, H, W)) == expected
    # reduced, p = 4: tokens on a 3 x 2 grid (floor), restore on the token grid
    pool = create_pool2d('nlp_headfix2_nowin_reduced', C, 2)
    n, d = 6, 32
    assert count_macs(pool, (C, H, W)) == C * d * 16 * n + 3 * d * d * n + 2 * n * n * d + d * d * n + d * C * n
    # window-normalised with s dividing p and the map tiled by patches: an average pool in eval, no MACs
    assert count_macs(create_pool2d('nlp_headfix2_reduced', C, 2), (C, 12, 12)) == 0
    # deformable: the deformable conv counts as a conv, plus its offset and mask convs (3x3, 2 p^2 + p^2 outputs)
    assert count_macs(create_pool2d('dfmnlp_headfix2', C, 2), (C, H, W)) == expected + 3 * C * 9 * N


def test_stock_resnet18_macs_and_model_is_untouched():
    model = timm.create_model('resnet18')
    assert 1.80e9 < count_macs(model) < 1.83e9  # 1.81 GMACs, the published figure
    assert next(model.parameters()).device.type == 'cpu'
    # the paper's network: stages 2-4 at stride 1, each with attention over all its positions
    pooled = timm.create_model('resnet18_nlp_headfix2_1222', device='meta')
    assert 5.1 < count_macs(pooled) / count_macs(model) < 5.2


def _independent_count(model, x):
    """Live bytes of every step of a real forward, counted with hooks independently of the profiler: a leaf
    module holds its input and output; a pooling layer holds its input, importance map (input-sized for the
    weighted poolings, except where it is constant in every window: the token weights, measured here as the
    output of the restore norm, and their output-sized up-sampling, or nothing for a window-normalised such pool,
    an average pool in eval) and output; a dynamic conv its input and output, a deformable conv also the offsets
    and mask its offset and mask convs give. While their own layers run, these keep their input alive, and a pool
    also the maps it computed before them (mixp's non-local map during its local branch; the pooled map of a
    window-constant pool, here an avg-pooled copy of its input), counted once (by storage) at each step that
    neither takes nor gives them."""
    from timm_nlp.layers import DeformConv2d, DynamicConv2d, GaussianPool2d, WeightedPool2d
    steps, held, hooks, maps, depth = [], [], [], {}, []
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731

    def record(name, i, o, extra=0):
        own = {ptr(i[0]), ptr(o)}
        kept = {ptr(t): nbytes(t) for t in held if ptr(t) not in own}
        steps.append((name, nbytes(i[0]) + nbytes(o) + extra + sum(kept.values())))

    def enter(m, i):
        depth.append(len(held))
        held.append(i[0])
        if isinstance(m, WeightedPool2d) and not m.win_norm and m.window_constant(i[0]):
            held.append(F.avg_pool2d(i[0], m.stride, m.stride))

    for name, m in model.named_modules():
        if isinstance(m, (WeightedPool2d, GaussianPool2d, DynamicConv2d, DeformConv2d)):
            hooks.append(m.register_forward_pre_hook(enter))
            if isinstance(m, WeightedPool2d) and m.local is not None and m.non_local is not None:
                hooks.append(m.non_local.register_forward_hook(lambda mod, i, o: held.append(o)))
            if isinstance(m, WeightedPool2d) and m.non_local is not None:
                hooks.append(m.non_local.restore_norm.register_forward_hook(
                    lambda mod, i, o, name=name: maps.__setitem__(name, o)))
            if isinstance(m, DeformConv2d):
                hooks.append(m.offset.register_forward_hook(lambda mod, i, o, name=name: maps.__setitem__(name, o)))
                hooks.append(m.mask.register_forward_hook(
                    lambda mod, i, o, name=name: maps.__setitem__(name + '.mask', o)))

            def compound_hook(m, i, o, name=name):
                del held[depth.pop():]
                w = 0
                if isinstance(m, DeformConv2d):  # the offsets and the mask, cropped to the token grid
                    o = o[0]
                    h, w_ = o.shape[-2:]
                    w = sum(nbytes(maps[key][:, :, :h, :w_]) for key in (name, name + '.mask'))
                elif isinstance(m, WeightedPool2d):
                    w = nbytes(i[0])
                    if m.window_constant(i[0]):  # token weights, up-sampled to the pooled windows
                        w = 0 if m.win_norm else nbytes(maps[name]) + nbytes(o)
                record(name, i, o, w)
            hooks.append(m.register_forward_hook(compound_hook))
        elif name and not list(m.children()):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: record(name, i, o)))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return steps


@pytest.mark.parametrize('name,size', [
    ('resnet18', 96), ('mobilenetv2_100', 96), ('resnet18_nlp_headfix2_2222', 96), ('mobilenetv2_lip_4222121', 96),
    ('resnet18_gaussian_pool_4222', 96), ('resnet18_nlp_headfix2_nowin_reduced_2222', 96),
    ('resnet18_nlp_headfix2_nowin_reduced_2222', 100),  # 25 x 25 maps: patches of 4 do not tile it
    ('resnet18_nlp_reduced_2222', 96), ('resnet18_dfmixp_2222', 64), ('dyresnet18_dfmnlp_reduced_1222', 64),
    ('dymobilenetv2_lip_2222121', 64), ('mobilenetv2b0_mixp_2222121', 64),
    ('prepool-nlp_headfix2-4-resnet18-skip-1222', 64),
])
def test_profile_equals_independent_count(name, size):
    model = timm_nlp.create_model(name)
    steps = _independent_count(model, torch.randn(1, 3, size, size))
    profile = activation_profile(model, (3, size, size))
    assert [(s.name, s.live_bytes) for s in profile.layers] == steps
    assert profile.peak_bytes == max(b for _, b in steps)


def test_maps_computed_before_a_pools_branch_are_held_and_maps_are_not_summed():
    # mixp: the non-local map (input-sized) is live through the whole local branch
    mixp = activation_profile(timm.create_model('resnet18_mixp_2222', device='meta'), (3, 64, 64)).layers
    norm = next(s for s in mixp if s.name == 'layer1.pool.local.norm')
    assert norm.held_bytes == 2 * 64 * 16 * 16 * 4  # the pool's input and its non-local map
    assert next(s for s in mixp if s.name == 'layer1.pool.non_local.attn.qkv').held_bytes == 64 * 16 * 16 * 4
    # a pool weighting after pooling computes the pooled map first
    name = 'resnet18_nlp_headfix2_nowin_reduced_2222'
    nowin = activation_profile(timm.create_model(name, device='meta'), (3, 64, 64)).layers
    embed = next(s for s in nowin if s.name == 'layer1.pool.non_local.patch_embed')
    assert embed.held_bytes == 64 * 8 * 8 * 4
    # the largest map is one tensor: a pool's importance map is not added to its output
    profile = activation_profile(timm_nlp.create_model('prepool-lip-4-resnet18-skip-1222'), (3, 64, 64))
    pool = next(s for s in profile.layers if s.name == 'maxpool')
    assert (pool.in_bytes, pool.operand_bytes, pool.out_bytes) == (64 * 64 * 64 * 4, 64 * 64 * 64 * 4, 64 * 16 * 16 * 4)
    assert profile.largest_map_bytes == 64 * 64 * 64 * 4


def test_dynamic_conv_is_one_step_like_a_conv():
    """Same activations, same memory: each DynamicConv2d is the step of the conv it replaces, its routing layers
    (on the pooled input) extra steps that hold its input."""
    plain = activation_profile(timm.create_model('resnet18_skip_2222'), (3, 64, 64)).layers
    dy = activation_profile(timm.create_model('dyresnet18_skip_2222'), (3, 64, 64)).layers
    routing = [s for s in dy if s.name.endswith(('.fc1', '.fc2'))]
    convs = {s.name: s for s in dy if s.kind == 'DynamicConv2d'}
    assert len(convs) == 21 and len(routing) == 42  # the stem, 16 block convs, 4 shortcuts
    steps = [(s.name, s.live_bytes) for s in dy if not s.name.endswith(('.fc1', '.fc2'))]
    assert steps == [(s.name, s.live_bytes) for s in plain]
    for s in routing:
        assert s.held_bytes == convs[s.name.rpartition('.')[0]].in_bytes
    stage_peak = {n: profile_model(n).stage_peak_bytes for n in ('resnet18_skip_2222', 'dyresnet18_skip_2222')}
    assert stage_peak['dyresnet18_skip_2222'] == stage_peak['resnet18_skip_2222']


def test_pool_input_is_counted_once():
    """A pre-pool's input is the stem's output and its patch embedding's input: live there, but not held on top;
    the steps of its branch hold it."""
    profile = activation_profile(timm_nlp.create_model('prepool-nlp_headfix2-4-resnet18-skip-1222', device='meta'),
                                 (3, 128, 128))
    embed = next(s for s in profile.layers if s.name == 'maxpool.non_local.patch_embed')
    stem = 64 * 128 * 128 * 4
    assert embed.held_bytes == 0 and embed.live_bytes == stem + 64 * 64 * 64 * 4
    assert next(s for s in profile.layers if s.name == 'maxpool.non_local.norm').held_bytes == stem
    pool = next(s for s in profile.layers if s.name == 'maxpool')
    assert (pool.in_bytes, pool.operand_bytes, pool.out_bytes) == (stem, stem, 64 * 32 * 32 * 4)
    assert (profile.peak_bytes, profile.peak_layer.name) == (2 * stem + 64 * 32 * 32 * 4, 'maxpool')


def test_dynamic_and_deformable_conv_macs():
    C, Co, K, hidden, N = 16, 32, 4, 5, 8 * 8  # 3 x 3, stride 2 on 16 x 16; hidden = int(16 / 4) + 1
    conv = Co * C * 9 * N
    # the conv with the mixed kernel; mixing the K kernels and biases; the routing MLP
    dyn = DynamicConv2d(C, Co, 3, stride=2, padding=1, num_kernels=K)
    assert count_macs(dyn, (C, 16, 16)) == conv + K * Co * C * 9 + K * Co + C * hidden + hidden * K
    # the deformable conv (kernel = stride = 3: 5 x 5 outputs) counts as a conv, plus its offset and mask convs
    # (3 x 3, stride 3, pad 1: 6 x 6 outputs, 18 and 9 channels)
    assert count_macs(DeformConv2d(C, Co, 3), (C, 16, 16)) == Co * C * 9 * 25 + 27 * C * 9 * 36
    # a dynamic model: the plain one's MACs, plus one per parameter of its DynamicConv2ds but the routing biases
    dy = timm.create_model('dyresnet18_skip_2222')
    extra = sum(p.numel() for m in dy.modules() if isinstance(m, DynamicConv2d)
                for n, p in m.named_parameters() if n != 'fc2.bias')
    assert count_macs(dy, (3, 64, 64)) == \
        count_macs(timm.create_model('resnet18_skip_2222'), (3, 64, 64)) + extra


@pytest.mark.parametrize('backbone,stage,stock', [('resnet18', 'layer1.', '1222'),
                                                  ('mobilenetv2', 'blocks.0.', '1222121')])
def test_first_stage_output_shrinks_with_the_stride(backbone, stage, stock):
    def stage1_bytes(digits):
        layers = activation_profile(timm.create_model(f'{backbone}_lip_{digits}'), (3, 224, 224)).layers
        return [s.out_bytes for s in layers if s.name.startswith(stage)][-1]
    base = stage1_bytes(stock)
    assert stage1_bytes('2' + stock[1:]) * 4 == base
    assert stage1_bytes('4' + stock[1:]) * 16 == base


def test_profile_cli_compare_and_plot(tmp_path):
    import subprocess
    import sys
    png = tmp_path / 'mem.png'
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'profile', 'resnet18_lip_2222',
                           'prepool-maxp-4-resnet18-skip-1222', '--compare', '--img-size', '64', '--plot', str(png)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [r.split('|') for r in proc.stdout.splitlines() if r.startswith('| resnet18') or r.startswith('| prepool')]
    names = [r[1].strip() for r in rows]
    assert names == ['resnet18_lip_2222', 'prepool-maxp-4-resnet18-skip-1222', 'resnet18']
    stock_peak = activation_profile(timm.create_model('resnet18'), (3, 64, 64)).peak_bytes
    assert float(rows[2][5]) == round(stock_peak / 1024) and rows[2][6].strip() == '1.00x'
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'profile', 'resnet18_lip_2222', '--img-size', '64'],
                          capture_output=True, text=True)
    assert '| 0 | conv1 (Conv2d) | 1x64x32x32 |' in proc.stdout
    # a pooling step: its importance map in its own column, as large as its input; live is the sum of the columns
    row = next(r.split('|') for r in proc.stdout.splitlines() if '| layer1.pool (WeightedPool2d) |' in r)
    kib = [float(v) for v in row[4:9]]
    assert kib[0] == kib[2] == 64 * 16 * 16 * 4 / 1024 and kib[4] == sum(kib[:4])
