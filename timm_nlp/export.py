"""Deployment: ONNX export of every pooling family, checked with onnxruntime.

``torch.compile(model)`` needs nothing from this package: every layer compiles as is (tested for each
pooling family). ONNX needs one addition: torchvision's ``deform_conv2d`` (dfmnlp, dfmixp) has no ONNX
symbolic, so it is mapped to the ONNX ``DeformConv`` operator (opset 19), which onnxruntime implements.
Dynamic-convolution models fold the batch into conv groups, so they export for a fixed batch size.
"""
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.onnx import symbolic_helper

__all__ = ['register_onnx_symbolics', 'export_onnx', 'DEFAULT_OPSET']

DEFAULT_OPSET = 19
_REGISTERED = False


@symbolic_helper.parse_args('v', 'v', 'v', 'v', 'v', 'i', 'i', 'i', 'i', 'i', 'i', 'i', 'i', 'b')
def _deform_conv2d(g, x, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups,
                   offset_groups, use_mask):
    inputs = [x, weight, offset, bias] + ([mask] if use_mask else [])
    return g.op('DeformConv', *inputs, strides_i=[stride_h, stride_w], pads_i=[pad_h, pad_w, pad_h, pad_w],
                dilations_i=[dil_h, dil_w], group_i=groups, offset_group_i=offset_groups)


def register_onnx_symbolics() -> None:
    """Map ``torchvision::deform_conv2d`` to ONNX ``DeformConv`` for the TorchScript-based exporter."""
    global _REGISTERED
    if not _REGISTERED:
        import torchvision.ops  # noqa: F401  registers torch.ops.torchvision
        torch.onnx.register_custom_op_symbolic('torchvision::deform_conv2d', _deform_conv2d, DEFAULT_OPSET)
        _REGISTERED = True


def export_onnx(
        model: nn.Module,
        path: str,
        input_size: Tuple[int, int, int] = (3, 224, 224),
        batch_size: int = 1,
        opset: int = DEFAULT_OPSET,
        check: bool = True,
) -> Optional[float]:
    """Export ``model`` (in eval mode) to ONNX; with ``check``, run it in onnxruntime on a random input and
    return the largest absolute difference from PyTorch's output."""
    if opset < 17:
        raise ValueError(f'opset {opset} is too old: use 17 or newer (19 for the deformable poolings).')
    register_onnx_symbolics()
    model = model.eval()
    x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))
    torch.onnx.export(model, (x,), path, opset_version=opset, input_names=['input'], output_names=['output'],
                      dynamo=False)
    if not check:
        return None
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    out = session.run(None, {'input': x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(out - ref).max())
