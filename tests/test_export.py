"""ONNX (onnxruntime) and torch.compile parity, one model of each pooling family."""
import pytest
import torch
from torch import nn

import timm_nlp
from reference import pooling_reaches_logits, randomize_model
from timm_nlp.export import export_onnx
from timm_nlp.grammar import POOL_METHODS
from timm_nlp.layers import GaussianPool2d, WeightedPool2d, create_pool2d

FAMILY_MODELS = [
    'resnet18_skip_4222', 'resnet18_maxp_2222', 'resnet18b1_avgp_2222', 'resnet18_lip_2222',
    'mobilenetv2_gaussian_pool_2222121', 'resnet18_nlp_headfix2_2222', 'resnet18_nlp_headfix2_nowin_reduced_1222',
    'resnet18_dfmnlp_2222', 'resnet18b1_mixp_2222', 'mobilenetv2_dfmixp_2222121', 'mobilenetv2b0_nlp_2222121',
    'dyresnet18_lip_2222', 'dyresnet18_dfmnlp_reduced_1222', 'prepool-lip-8-resnet18-skip-1222',
    'prepool-nlp_headfix2-4-mobilenet_v2-skip-1222121',
]


def features(model, x):
    """Every feature map (MobileNetV2's logits attenuate a pool's change below the tolerance)."""
    return torch.cat([f.flatten() for f in model.forward_intermediates(x, intermediates_only=True)])


def _model(name):
    torch.manual_seed(0)
    return randomize_model(timm_nlp.create_model(name).eval())


# 70 px: odd maps (floor-mode pools drop a row and a column; patches do not tile them)
@pytest.mark.parametrize('name,size', [(name, 48) for name in FAMILY_MODELS] + [
    ('mobilenetv2_gaussian_pool_2222121', 70), ('resnet18_nlp_headfix2_nowin_reduced_2222', 70)])
def test_onnx_matches_pytorch(name, size, tmp_path):
    model = _model(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tol = 1e-5 * max(1., model(x).abs().max().item())
    if any(isinstance(m, (WeightedPool2d, GaussianPool2d)) for m in model.modules()):
        assert pooling_reaches_logits(model, x, 10 * tol, output=features)  # in the feature maps: see features()
    diff = export_onnx(model, str(tmp_path / 'model.onnx'), (3, size, size), batch_size=2)
    assert diff is not None and diff <= tol, f'{name}: onnxruntime differs by {diff} (tolerance {tol:.2g})'


def _batch_dim(path):
    import onnx
    dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or dim.dim_value


def test_onnx_batch_axis(tmp_path):
    # dynamic by default (the check above ran batch 2 and 3); a dynamic-conv model then exports its
    # batch-agnostic form, the fixed-batch export keeps the grouped form and says its batch in the graph
    model, path = _model('dyresnet18_lip_2222'), str(tmp_path / 'model.onnx')
    assert export_onnx(model, path, (3, 32, 32), batch_size=1) <= 1e-4
    assert _batch_dim(path) == 'batch'
    assert not any(getattr(m, 'batch_agnostic', False) for m in model.modules())  # restored after export
    assert export_onnx(model, path, (3, 32, 32), batch_size=2, dynamic_batch=False) <= 1e-4
    assert _batch_dim(path) == 2


def test_onnx_features_only_and_model_mode(tmp_path):
    # a detection backbone: every output exported with a dynamic batch and checked; the caller's mode is kept
    torch.manual_seed(0)
    model = randomize_model(timm_nlp.create_model('resnet18_lip_2222', features_only=True, out_indices=(2, 3)))
    path = str(tmp_path / 'features.onnx')
    assert export_onnx(model.train(), path, (3, 48, 48), batch_size=2) <= 1e-4 and model.training
    import onnx
    outputs = onnx.load(path).graph.output
    assert [o.name for o in outputs] == ['output0', 'output1']
    assert all(o.type.tensor_type.shape.dim[0].dim_param == 'batch' for o in outputs)
    with pytest.raises(ValueError, match='batch_size must be >= 1, got 0'):
        export_onnx(model, path, batch_size=0)


def test_onnx_opset_floor(tmp_path):
    with pytest.raises(ValueError, match='opset 13 is too old'):
        export_onnx(_model('resnet18_lip_2222'), str(tmp_path / 'm.onnx'), opset=13)


def _compiled_matches(model, x):
    torch._dynamo.reset()  # a fresh cache: never a silent eager fallback after the recompile limit
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: no graph breaks either
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('pool', [m for m in POOL_METHODS if m != 'skip'] + ['nlp_headfix2_nowin_reduced'])
def test_torch_compile_matches_eager_per_family(pool):
    """A small pooled network per family (inductor compiles a full ResNet in tens of seconds on 2 cores)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          create_pool2d(pool, 16, 2), nn.Conv2d(16, 8, 1)).eval()
    randomize_model(model)
    _compiled_matches(model, torch.randn(2, 3, 24, 24))


@pytest.mark.parametrize('name', ['resnet18_nlp_headfix2_2222'])
def test_torch_compile_matches_eager_full_model(name):
    model, x = _model(name), torch.randn(2, 3, 48, 48)
    assert pooling_reaches_logits(model, x)
    _compiled_matches(model, x)
