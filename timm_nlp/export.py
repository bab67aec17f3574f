"""Deployment: ONNX export of every pooling family, checked with onnxruntime.

``torch.compile(model)`` needs nothing from this package: every layer compiles as is (tested for each
pooling family). ONNX needs one addition: torchvision's ``deform_conv2d`` (dfmnlp, dfmixp) has no ONNX
symbolic, so it is mapped to the ONNX ``DeformConv`` operator (opset 19), which onnxruntime implements.
The batch axis is dynamic by default. Dynamic convolutions fold the batch into conv groups, which an ONNX graph
cannot take from its input, so with a dynamic batch they export in their batch-agnostic form (all K kernels in
one convolution, outputs mixed: K times the MACs); ``dynamic_batch=False`` keeps the grouped form at 1x MACs
for one fixed batch size.
"""
import contextlib
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.onnx import symbolic_helper

from timm_nlp.layers import DynamicConv2d

__all__ = ['register_onnx_symbolics', 'export_onnx', 'DEFAULT_OPSET']

DEFAULT_OPSET = 19
_REGISTERED = False


@symbolic_helper.parse_args('v', 'v', 'v', 'v', 'v', 'i', 'i', 'i', 'i', 'i', 'i', 'i', 'i', 'b')
def _deform_conv2d(g, x, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups,
                   offset_groups, use_mask):
    inputs = [x, weight, offset, bias] + ([mask] if use_mask else [])
    out = g.op('DeformConv', *inputs, strides_i=[stride_h, stride_w], pads_i=[pad_h, pad_w, pad_h, pad_w],
               dilations_i=[dil_h, dil_w], group_i=groups, offset_group_i=offset_groups)
    # the traced output type would fix the batch size of every shape read from it: leave the sizes to ONNX
    out.setType(x.type().with_sizes([None, None, None, None]))
    return out


def register_onnx_symbolics() -> None:
    """Map ``torchvision::deform_conv2d`` to ONNX ``DeformConv`` for the TorchScript-based exporter."""
    global _REGISTERED
    if not _REGISTERED:
        import torchvision.ops  # noqa: F401  registers torch.ops.torchvision
        torch.onnx.register_custom_op_symbolic('torchvision::deform_conv2d', _deform_conv2d, DEFAULT_OPSET)
        _REGISTERED = True


@contextlib.contextmanager
def _batch_agnostic(model: nn.Module, enabled: bool) -> Iterator[None]:
    saved = {m: m.batch_agnostic for m in model.modules() if isinstance(m, DynamicConv2d)} if enabled else {}
    for m in saved:
        m.batch_agnostic = True
    try:
        yield
    finally:
        for m, value in saved.items():
            m.batch_agnostic = value


def export_onnx(
        model: nn.Module,
        path: str,
        input_size: Tuple[int, int, int] = (3, 224, 224),
        batch_size: int = 1,
        opset: int = DEFAULT_OPSET,
        check: bool = True,
        dynamic_batch: bool = True,
) -> Optional[float]:
    """Export ``model`` (run in eval mode, its mode restored after) to ONNX, traced at ``batch_size``, with a dynamic
    batch axis unless ``dynamic_batch`` is False; a model with several outputs (``features_only``) gets outputs
    ``output0``, ``output1``... With ``check``, run it in onnxruntime on random inputs (batch ``batch_size``, and
    ``batch_size + 1`` for a dynamic batch) and return the largest absolute difference from PyTorch's outputs."""
    if opset < 17:
        raise ValueError(f'opset {opset} is too old: use 17 or newer (19 for the deformable poolings).')
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
    register_onnx_symbolics()
    training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_size, generator=gen)

    def run(xb: torch.Tensor) -> List[np.ndarray]:
        with torch.no_grad():
            out = model(xb)
        return [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]
    try:
        first = run(x)  # PyTorch's outputs at the traced batch: their count names the graph's outputs
        names = ['output'] if len(first) == 1 else [f'output{i}' for i in range(len(first))]
        axes = {name: {0: 'batch'} for name in ['input'] + names} if dynamic_batch else None
        with _batch_agnostic(model, dynamic_batch):
            torch.onnx.export(model, (x,), path, opset_version=opset, input_names=['input'], output_names=names,
                              dynamic_axes=axes, dynamo=False)
        if not check:
            return None
        import onnxruntime as ort
        session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        diff = 0.
        for batch in (batch_size, batch_size + 1) if dynamic_batch else (batch_size,):
            xb = x if batch == batch_size else torch.randn(batch, *input_size, generator=gen)
            refs = first if batch == batch_size else run(xb)
            for name, out, ref in zip(names, session.run(names, {'input': xb.numpy()}), refs):
                if out.shape != ref.shape:
                    raise RuntimeError(f'ONNX {name} shape {out.shape} differs from PyTorch {ref.shape} at batch '
                                       f'{batch}.')
                diff = max(diff, float(np.abs(out - ref).max()))
        return diff
    finally:
        model.train(training)
