"""Deployment (timm_nlp.deploy): int8 TFLite models that TensorFlow Lite Micro runs, its arena, the ``tflm``
accounting that predicts it, patch-based execution in one graph, and the errors before any conversion.

Conversions take 15-60 s each on two cores: the models here are small (32-64 px, 10 classes, minmax calibration on a
few Fashion-MNIST images); the 224 px table is ``benchmarks/bench_deploy.py``'s."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import timm_nlp
from timm_nlp.export_model import export_form_model
from timm_nlp.layers.export_ops import ExportError, TwoSchedules
from timm_nlp.patching import patched_profile
from timm_nlp.profiler import activation_profile, deployed_form, tflm_profile

deploy = pytest.importorskip('timm_nlp.deploy', reason="needs the deploy extra: pip install 'timm-nlp[deploy]'")
from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from timm_nlp.deploy.calibration import calibration_images  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _model(name: str, size: int) -> nn.Module:
    """``name`` with 10 classes, its norms' statistics those of Fashion-MNIST images (a random network's are not:
    int8 ranges of untrained statistics say little)."""
    torch.manual_seed(0)
    model = timm_nlp.create_model(name, num_classes=10)
    images = calibration_images('fashion-mnist', model, (3, size, size), 64)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(images[:32])
    return model.eval(), images[32:]


def _int8(images: torch.Tensor, exported) -> np.ndarray:
    _, _, scale, zero = exported.io['inputs'][0]
    x = np.round(images.permute(0, 2, 3, 1).numpy() / scale) + zero
    return np.clip(x, -128, 127).astype(np.int8)[:, None]


def _float(outputs: np.ndarray, exported) -> np.ndarray:
    _, _, scale, zero = exported.io['outputs'][0]
    return (outputs.astype(np.float32) - zero).reshape(len(outputs), -1) * scale


def _unreferenced_activations(flat: bytes) -> list:
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flat, 0))
    sg = model.subgraphs[0]
    used = set(sg.inputs) | set(sg.outputs)
    for op in sg.operators:
        used.update(op.inputs, op.outputs)
    return [t.name for i, t in enumerate(sg.tensors) if i not in used and model.buffers[t.buffer].data is None]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.slow
def test_a_local_network_deploys_fully_int8():
    model, images = _model('resnet18_maxp_2222', 48)
    exported = deploy.export_tflite(model, images[:4], observer='minmax')
    assert exported.fully_int8 and exported.float_ops == []
    assert not any(op in exported.ops for op in ('PAD', 'PADV2', 'QUANTIZE', 'DEQUANTIZE'))  # SAME-padded convs
    assert exported.io['inputs'][0][:2] == ('INT8', (1, 48, 48, 3)) and exported.io['outputs'][0][:2] == ('INT8',
                                                                                                       (1, 10))
    x = _int8(images, exported)
    out = deploy.tflm_run(exported.flatbuffer, x)
    agree, worst = deploy.lsb_agreement(out, deploy.litert_reference(exported.flatbuffer, x))
    assert agree >= 0.99, (agree, worst)
    with pytest.raises(ValueError, match="kernels 'fast' is not one of reference, builtin"):
        deploy.litert_reference(exported.flatbuffer, x, 'fast')
    with torch.no_grad():
        ref = model(images).numpy()
    ours = _float(out, exported)
    assert _cosine(ours, ref).mean() > 0.95 and (ours.argmax(1) == ref.argmax(1)).mean() >= 0.8
    arena = deploy.tflm_arena(exported.flatbuffer)
    assert arena.searched and arena.arena_bytes == arena.head + arena.tail
    # the tflm accounting predicts the head from the model alone
    counted = activation_profile(model, (3, 48, 48), dtype='int8', accounting='tflm').peak_bytes
    assert abs(counted - arena.head) <= 0.05 * arena.head, (counted, arena.head)
    assert deploy.live_bytes_peak(exported.flatbuffer)[0] == arena.head


@pytest.mark.slow
def test_patch_based_execution_deploys_as_one_graph():
    model, images = _model('resnet18_lip_2222', 64)
    whole = deploy.export_tflite(model, images[:4], observer='minmax')
    patched = deploy.export_tflite(model, images[:4], patches=2, split='layer1', observer='minmax')
    assert patched.fully_int8 and patched.split == 'layer1' and patched.ops['SLICE'] >= 4
    assert patched.io == whole.io
    x = _int8(images, patched)
    # the patches take the whole map's quantisation: the same int8 outputs, bit for bit
    np.testing.assert_array_equal(deploy.tflm_run(patched.flatbuffer, x), deploy.tflm_run(whole.flatbuffer, x))
    arena = deploy.tflm_arena(patched.flatbuffer, search=False)
    counted = patched_profile(model, (3, 64, 64), 2, 'layer1', dtype='int8', accounting='tflm').peak_bytes
    assert abs(counted - arena.head) <= 0.05 * arena.head, (counted, arena.head)


@pytest.mark.slow
def test_a_non_local_network_on_patches_gives_its_whole_map_outputs(monkeypatch):
    # the first pool (stride 4: 8 x 8 tokens at 64 px) in the prefix: embedded patch by patch,
    # attention on the assembled tokens; every pool in the joint schedule in both models (the lean one re-embeds the
    # map for a second head on the whole map only, other int8 ops than from assembled tokens)
    def joint(model, input_size, deployed=None):
        for m in model.modules():
            if isinstance(m, TwoSchedules):
                m.lean = False
        return 0
    for module in ('timm_nlp.profiler', 'timm_nlp.patching'):
        monkeypatch.setattr(f'{module}.choose_schedules', joint)
    model, images = _model('resnet18-nlp_headfix2_nowin_reduced-4222', 64)
    whole = deploy.export_tflite(model, images[:4], observer='minmax')
    patched = deploy.export_tflite(model, images[:4], patches=2, split='layer1', observer='minmax')
    assert patched.fully_int8
    x = _int8(images[:8], patched)
    np.testing.assert_array_equal(deploy.tflm_run(patched.flatbuffer, x), deploy.tflm_run(whole.flatbuffer, x))
    arena = deploy.tflm_arena(patched.flatbuffer, search=False)
    counted = patched_profile(model, (3, 64, 64), 2, 'layer1', dtype='int8', accounting='tflm').peak_bytes
    assert abs(counted - arena.head) <= 0.05 * arena.head, (counted, arena.head)


@pytest.mark.slow
def test_a_non_local_pool_deploys_with_its_attention_in_chunks():
    # p = 1 pools: 24 x 24 = 576 tokens in layer1 (rows longer than TFLite Micro's int8 softmax output takes: an int16
    # output requantised to int8), 144 in layer2
    model, images = _model('resnet18_nlp_headfix2_2222', 96)
    exported = deploy.export_tflite(model, images[:4], chunk=100, observer='minmax')
    ops = exported.ops
    assert exported.fully_int8 and exported.wide_softmax == 2 * 6
    # two heads: layer1's 576 queries in chunks of 100 (one SPLIT_V each); layer2's 144 at once (as many scores);
    # layer3, layer4: one
    assert ops['SOFTMAX'] == 2 * 6 + 2 + 2 + 2 and ops['QUANTIZE'] == 2 * 6 and 'DEQUANTIZE' not in ops
    assert ops['SPLIT_V'] == 2, ops
    # layer1, the peak, projects each head's queries, keys and values alone; layers 2-4 project them jointly and
    # slice them apart (6 a pool)
    assert ops['SLICE'] == 3 * 6, ops
    wide = [op for op in deploy.op_list(exported.flatbuffer) if op.name == 'SOFTMAX' and op.outputs[0][0] == 'INT16']
    assert len(wide) == 2 * 6 and all(op.inputs[0] == ('INT8', (100, 576)) or op.inputs[0] == ('INT8', (76, 576))
                                      for op in wide)
    assert not {'SIGN', 'FLOOR_MOD', 'FLOOR_DIV', 'GATHER', 'EXP', 'BATCH_MATMUL'} & set(ops)
    x = _int8(images[:4], exported)
    out = deploy.tflm_run(exported.flatbuffer, x)
    # LiteRT's kernels read the int16 softmaxes alike (a few LSB apart on this untrained network, as with float ones)
    litert = deploy.litert_reference(exported.flatbuffer, x, kernels='builtin')
    assert _cosine(_float(out, exported), _float(litert, exported)).min() > 0.99
    with torch.no_grad():
        ref = model(images[:4]).numpy()
    assert _cosine(_float(out, exported), ref).mean() > 0.95
    arena = deploy.tflm_arena(exported.flatbuffer, search=False)
    form = deployed_form(model, (3, 96, 96), chunk=100)  # batch 1, as it is deployed
    profile = tflm_profile(form, (3, 96, 96))
    counted = profile.peak_bytes  # the int16 softmax outputs and their int8 copies
    assert abs(counted - arena.head) <= 0.05 * arena.head, (counted, arena.head)
    # each pool's second head embeds the map again: the converter keeps it (no convolution merged with another)
    assert ops['CONV_2D'] == sum(step.kind == 'convolution' for step in profile.layers)
    unchunked = tflm_profile(export_form_model(model, (3, 96, 96), chunk=None), (3, 96, 96)).peak_bytes
    assert arena.head < unchunked - 2 * 576 * (576 - 100)  # no 576 x 576 score matrix
    with torch.no_grad():
        assert torch.allclose(form(images[:1]), model(images[:1]), atol=1e-4)


class _Cut(nn.Module):
    """A map cut into rows of 3 (3, 3, 2: ``torch.split``), and rows 1-3 sliced apart later."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x[0] * 2
        return torch.cat([p * (i + 1) for i, p in enumerate(torch.split(y, 3, 0))] + [y[1:4] * 10], 0)


def test_the_slices_of_a_split_become_one_split_v():
    import litert_torch
    flat = litert_torch.convert(_Cut().eval(), (torch.randn(1, 8, 5),)).model_content()
    fused, count = deploy.fuse_split(flat)
    assert count == 1
    names = [op.name for op in deploy.op_list(fused)]
    assert names.count('SPLIT_V') == 1 and names.count('SLICE') == 1  # the later slice of rows 1-3 is its own
    assert names.index('SPLIT_V') < names.index('SLICE') and len(names) == len(deploy.op_list(flat)) - 2
    assert _unreferenced_activations(fused) == []
    x = torch.randn(3, 1, 8, 5).numpy()
    np.testing.assert_array_equal(deploy.litert_reference(fused, x), deploy.litert_reference(flat, x))
    np.testing.assert_allclose(deploy.litert_reference(fused, x)[0], _Cut()(torch.from_numpy(x[0])).numpy())
    assert deploy.fuse_split(fused) == (fused, 0)


@pytest.mark.slow
def test_a_gaussian_pool_deploys_fully_int8():
    """softplus(x) = -log(softmax([x, 0]))[1] becomes one int8 LOG_SOFTMAX; a window's standard deviation, the mean of
    its deviations times their L2-normalised selves (times sqrt of its size), one int8 L2_NORMALIZATION and no SQRT
    (float only in TFLite Micro) or RSQRT (whose range would reach 1 / sqrt(eps))."""
    model, images = _model('resnet18_gaussian_pool_2222', 48)
    exported = deploy.export_tflite(model, images[:4], observer='minmax')
    ops = exported.ops
    # the fourth pool's windows are single pixels at 48 px (their deviation is 0: std = sqrt(eps), a constant)
    assert exported.fully_int8 and ops['LOG_SOFTMAX'] == 4 and ops['L2_NORMALIZATION'] == 3
    assert not {'LOG', 'EXP', 'SOFTMAX', 'SQRT', 'RSQRT', 'QUANTIZE', 'DEQUANTIZE'} & {k.split()[0] for k in ops}
    fused = [op for op in deploy.op_list(exported.flatbuffer) if op.name in ('LOG_SOFTMAX', 'L2_NORMALIZATION')]
    assert all(op.inputs[0][0] == 'INT8' and op.outputs[0][0] == 'INT8' for op in fused)
    x = _int8(images[:8], exported)
    out = deploy.tflm_run(exported.flatbuffer, x)
    agree, worst = deploy.lsb_agreement(out, deploy.litert_reference(exported.flatbuffer, x))
    assert agree >= 0.99, (agree, worst)
    with torch.no_grad():
        ref = model(images[:8]).numpy()
    assert _cosine(_float(out, exported), ref).mean() > 0.9
    # the fusions leave no tensor behind (TFLite Micro would allocate it), and the count is the measured head
    assert _unreferenced_activations(exported.flatbuffer) == []
    arena = deploy.tflm_arena(exported.flatbuffer, search=False)
    assert activation_profile(model, (3, 48, 48), dtype='int8', accounting='tflm').peak_bytes == arena.head


def test_an_l2_normalisation_the_converter_did_not_give_back_stops_the_export(monkeypatch):
    from timm_nlp.layers import create_pool2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), create_pool2d('gaussian_pool', 8, 2)).eval()
    images = torch.randn(2, 3, 16, 16)
    assert deploy.export_tflite(model, images, observer='minmax').ops['L2_NORMALIZATION'] == 1
    monkeypatch.setattr('timm_nlp.deploy.tflite.fuse_l2_normalization', lambda flat: (flat, 0))
    with pytest.raises(RuntimeError, match="1 of the graph's 1 L2 normalisations were not recognised"):
        deploy.export_tflite(model, images, observer='minmax')


def test_layers_without_an_exact_export_form_are_named_before_converting():
    model = timm_nlp.create_model('resnet18_dfmnlp_headfix2_reduced_2222', num_classes=3)
    with pytest.raises(ExportError, match=r"'layer1.pool' \(WeightedPool2d\) cannot be exported exactly: its "
                                          'deformable embedding'):
        deploy.export_tflite(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ExportError, match="'conv1' .*dynamic convolutions|'conv1' .*mixes per-sample kernels|"
                                          "'conv1' .*per-sample"):
        export_form_model(timm_nlp.create_model('dyresnet18_skip_1222', num_classes=3), (3, 32, 32))


def test_without_the_extra_the_message_says_how_to_install_it():
    code = ("import sys; sys.modules['litert_torch'] = None\n"
            "try:\n    import timm_nlp.deploy\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'timm-nlp[deploy]'" in out and 'litert_torch' in out


def test_a_failing_arena_never_takes_the_caller_down():
    model, images = _model('resnet18_avgp_4222', 32)
    exported = deploy.export_tflite(model, images[:2], observer='minmax')
    with pytest.raises(deploy.TFLMError, match='TFLite Micro failed'):
        deploy.tflm_run(exported.flatbuffer, _int8(images[:1], exported), arena=512)
    arena = deploy.tflm_arena(exported.flatbuffer)  # the search tries smaller arenas, in child processes
    assert arena.searched and arena.arena_bytes > 512
    assert activation_profile(model, (3, 32, 32), dtype='int8', accounting='tflm').peak_bytes == arena.head


def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'timm_nlp.cli', *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=900)


@pytest.mark.slow
def test_the_export_and_runtime_commands(tmp_path):
    out = tmp_path / 'model.tflite'
    proc = _cli('export', 'resnet18_avgp_2222', '--int8', '--img-size', 32, '--calib', 'digits', '--calib-count', 4,
                '--observer', 'minmax', '--output', out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'fully int8' in proc.stdout and out.stat().st_size > 10 ** 6
    x = np.zeros((1, 1, 32, 32, 3), np.int8)
    assert deploy.tflm_run(out.read_bytes(), x).shape == (1, 1, 10)
    proc = _cli('profile', 'resnet18_avgp_2222', '--runtime', 'tflm', '--img-size', 32, '--calib-count', 2,
                '--observer', 'minmax', '--json')
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = __import__('json').loads(proc.stdout)
    assert row['arena_bytes'] == row['head'] + row['tail'] and row['counted_head'] == row['head']
    assert row['float_ops'] == [] and row['flash_bytes'] > 10 ** 6


@pytest.mark.parametrize('args, message', [
    (['resnet18_lip_2222', '--calib', '/nonexistent'], "--calib '/nonexistent' is neither fashion-mnist nor digits"),
    (['resnet18_lip_2222', '--no-int8'], '--format tflite exports static int8 models for TFLite Micro: add --int8'),
    (['resnet18_dfmnlp_2222'], "'layer1.pool' (WeightedPool2d) cannot be exported exactly"),
    (['resnet18_lip_2222', '--format', 'onnx', '--patches', '2'], '--int8 and --patches apply to --format tflite'),
])
def test_export_errors_are_one_line(args, message, tmp_path, run_cli):
    args = [a for a in args if a != '--no-int8'] + (['--int8'] if '--no-int8' not in args and 'onnx' not in args
                                                      else [])
    proc = run_cli('export', *args, '--img-size', 32, '--output', tmp_path / 'x.tflite')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('timm-nlp export: error: ') and message in proc.stderr
