"""Static int8 post-training quantisation for fully int8 TFLite Micro graphs (PT2E).

litert-torch's own ``PT2EQuantizer`` annotates a few ops by where they came from in the source: the window pools of
timm-nlp (``F.max_pool2d`` behind a module), 'same'-padded convs, average pools, subtractions, divisions, sums and
matrix products stay float, and the converter surrounds them with DEQUANTIZE/QUANTIZE. This quantiser annotates every
op of the exported graph by its aten target instead:

- weighted ops (conv, linear): int8 activations in, per-channel symmetric int8 weights (activations used as weights,
  as in attention, per tensor), int8 out, fused with a ReLU / ReLU6 that is their only user;
- arithmetic (add, sub, mul, div, sum, rsqrt...): int8 in, int8 out with its own range;
- the log of a softmax (exported as one LOG_SOFTMAX, ``flatbuffer.fuse_log_softmax``): that kernel's fixed output
  quantisation (scale 16/256, zero point 127);
- the output of an ``L2Normalize`` (exported as one L2_NORMALIZATION, ``flatbuffer.fuse_l2_normalization``): that
  kernel's fixed output quantisation (scale 1/128, zero point 0);
- sigmoid and softmax: the fixed output quantisation TFLite's int8 kernels require (scale 1/256, zero point -128),
  except a softmax over rows longer than TFLite Micro's int8 output takes: its own range (the exported graph gives it an
  int16 output requantised to this, ``flatbuffer.widen_softmax``), finer than 1/256 where the attention is spread thin;
- layout, selection and pooling ops (reshape, slice, pad, max/avg pool, mean, gather, up-sampling, concatenation...):
  the output shares its input's quantisation, so nothing is requantised (LiteRT's reference MEAN kernel is wrong
  where the scales differ).

An op that runs several times (a layer on every patch of patch-based execution, an attention product on every
chunk) has one quantisation for all its runs, as one layer has one set of scales on a device: its outputs are
observed together, and concatenating them requantises nothing.
"""
import operator
from typing import Optional, Tuple

import torch
from torch.fx import GraphModule, Node

from litert_torch.quantize import pt2e_quantizer_utils
from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
from torchao.quantization.pt2e.observer import MinMaxObserver
from torchao.quantization.pt2e.quantizer import (
    FixedQParamsQuantizationSpec, QuantizationAnnotation, SharedQuantizationSpec)

from timm_nlp.export_model import OBSERVERS
from timm_nlp.layers.export_ops import INT8_SOFTMAX_MAX_ROW, L2Normalize

__all__ = ['FullInt8Quantizer', 'call_site']
_WEIGHTED = {'conv2d', 'convolution', 'linear'}
_ARITHMETIC = {
    'add', 'add_', 'sub', 'sub_', 'rsub', 'mul', 'mul_', 'div', 'div_', 'bmm', 'matmul', 'mm', 'addmm', 'sum', 'rsqrt',
    'square', 'tanh', 'abs', 'neg', 'hardswish', 'hardsigmoid', 'minimum', 'maximum', 'adaptive_avg_pool2d'}
_SOFTMAX = {'_softmax', 'softmax'}
_FIXED_UNIT = {'sigmoid', 'sigmoid_'} | _SOFTMAX  # outputs in [0, 1]
_SHARED = {
    'view', '_unsafe_view', 'reshape', 'permute', 'transpose', 't', 'slice', 'select', 'squeeze', 'unsqueeze',
    'expand', 'flatten', 'unflatten', 'clone', 'contiguous', 'pad', 'constant_pad_nd', 'max_pool2d', 'avg_pool2d',
    'index_select', 'repeat', 'alias', 'split', 'split_with_sizes', 'chunk', 'narrow', 'relu', 'relu_', 'hardtanh',
    'hardtanh_', 'clamp', 'clamp_min', 'gather', 'index', 'repeat_interleave', 'upsample_nearest2d', 'tile', 'getitem',
    'unbind', 'dropout', 'identity', 'mean'}
_FUSED_ACTIVATIONS = {'relu', 'relu_', 'hardtanh', 'hardtanh_'}
_SCALAR_OPERANDS = {'add', 'mul', 'sub', 'div', 'rsub'}


def _op_name(n: Node) -> Optional[str]:
    if n.op != 'call_function':
        return None
    if n.target is operator.getitem:
        return 'getitem'
    packet = getattr(n.target, 'overloadpacket', None)
    return packet.__name__ if packet is not None else getattr(n.target, '__name__', None)


def _is_float(n: object) -> bool:
    if not isinstance(n, Node):
        return False
    v = n.meta.get('val')
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def call_site(n: Node) -> Tuple[str, Tuple[str, ...], object]:
    """Where an op of the exported graph was called: the path of the module it ran in, the source lines of its call
    stack (its node name where the trace has none) and its target."""
    stack = n.meta.get('nn_module_stack') or {}
    module = list(stack.values())[-1][0] if stack else ''
    return module, tuple((n.meta.get('stack_trace') or '').strip().splitlines()) or (n.name,), n.target


def _in_l2_normalize(n: Node) -> bool:
    return any('L2Normalize' in str(v[1]) for v in n.meta.get('nn_module_stack', {}).values())


class FullInt8Quantizer(PT2EQuantizer):
    """Per-channel symmetric int8 weights and per-tensor affine int8 activations on every op (see the module
    docstring).

    Args:
        observer: 'histogram' (the activations' ranges from histograms, robust to outliers) or 'minmax' (fast).
    """

    def __init__(self, observer: str = 'histogram'):
        super().__init__()
        if observer not in OBSERVERS:
            raise ValueError(f"observer '{observer}' is not one of {', '.join(OBSERVERS)}.")
        self.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        self.act = pt2e_quantizer_utils.get_input_act_qspec(self.global_config)
        if observer == 'minmax':
            self.act = type(self.act)(**{**self.act.__dict__,
                                         'observer_or_fake_quant_ctr': MinMaxObserver.with_args(eps=2 ** -12)})
        self.weight = pt2e_quantizer_utils.get_weight_qspec(self.global_config)
        self.unit = FixedQParamsQuantizationSpec(dtype=torch.int8, scale=1 / 256, zero_point=-128, quant_min=-128,
                                                 quant_max=127, qscheme=torch.per_tensor_affine)
        scale, zero_point = L2Normalize.OUTPUT_QPARAMS
        self.l2_unit = FixedQParamsQuantizationSpec(dtype=torch.int8, scale=scale, zero_point=zero_point,
                                                    quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
        self.l2_normalizations = 0
        self.log_unit = FixedQParamsQuantizationSpec(dtype=torch.int8, scale=16 / 256, zero_point=127, quant_min=-128,
                                                     quant_max=127, qscheme=torch.per_tensor_affine)

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Python-number operands of arithmetic become constant tensors, so that they are quantised like inputs."""
        for n in list(model.graph.nodes):
            if _op_name(n) not in _SCALAR_OPERANDS or not _is_float(n):
                continue
            args = list(n.args)
            for i, a in enumerate(args):
                if isinstance(a, (int, float)) and not isinstance(a, bool):
                    attr = pt2e_quantizer_utils.get_new_attr_name_with_prefix('_tensor_constant_')(model)
                    model.register_buffer(attr, torch.tensor(float(a)))
                    with model.graph.inserting_before(n):
                        const = model.graph.create_node('get_attr', attr, (), {})
                        const.meta['val'] = torch.tensor(float(a))
                    args[i] = const
            n.args = tuple(args)
        model.recompile()
        return model

    def _input(self, a: object):
        """An input takes its producer's quantisation as it is (no requantising edge, e.g. a sigmoid's 1/256)."""
        ann = a.meta.get('quantization_annotation') if isinstance(a, Node) else None
        return SharedQuantizationSpec(a) if ann is not None and ann.output_qspec is not None else self.act

    def annotate(self, model: GraphModule) -> GraphModule:
        """Annotate every op of ``model``; counts its ``L2Normalize`` outputs (``l2_normalizations``)."""
        first_run: dict = {}
        self.l2_normalizations = 0

        def output_spec(n: Node):
            """A fresh quantisation for the first run of an op, that of its first run for the others."""
            first = first_run.setdefault(call_site(n), n)
            return self.act if first is n else SharedQuantizationSpec(first)

        for n in model.graph.nodes:
            name = _op_name(n)
            if name is None or 'quantization_annotation' in n.meta or not _is_float(n):
                continue
            users = list(n.users)
            fused = users[0] if len(users) == 1 and _op_name(users[0]) in _FUSED_ACTIVATIONS else None
            out = None if fused is not None else output_spec(n)
            if name == 'mul' and _in_l2_normalize(n) and any(_op_name(a) == 'rsqrt' for a in n.args):
                n.meta['quantization_annotation'] = QuantizationAnnotation(
                    {a: self._input(a) for a in n.args}, self.l2_unit, _annotated=True)
                self.l2_normalizations += 1
                continue
            if name in _WEIGHTED:
                x, w = n.args[0], n.args[1]
                qmap = {x: self._input(x), w: self.weight if w.op == 'get_attr' else self._input(w)}
                n.meta['quantization_annotation'] = QuantizationAnnotation(qmap, out, _annotated=True)
            elif name in _ARITHMETIC:
                qmap = {a: self._input(a) for a in n.args if _is_float(a)}
                n.meta['quantization_annotation'] = QuantizationAnnotation(qmap, out, _annotated=True)
            elif name in _FIXED_UNIT:
                wide = name in _SOFTMAX and n.meta['val'].shape[-1] > INT8_SOFTMAX_MAX_ROW
                n.meta['quantization_annotation'] = QuantizationAnnotation(
                    {n.args[0]: self._input(n.args[0])}, output_spec(n) if wide else self.unit, _annotated=True)
                continue
            elif name == 'log' and _op_name(n.args[0]) in _SOFTMAX:  # a LOG_SOFTMAX once converted
                n.meta['quantization_annotation'] = QuantizationAnnotation(
                    {n.args[0]: self._input(n.args[0])}, self.log_unit, _annotated=True)
                continue
            elif name in ('cat', 'stack'):
                ins = [a for a in n.args[0] if _is_float(a)]
                shared = SharedQuantizationSpec((ins[0], n))
                qmap = {ins[0]: self._input(ins[0]), **{a: shared for a in ins[1:]}}
                n.meta['quantization_annotation'] = QuantizationAnnotation(qmap, shared, _annotated=True)
                continue
            elif name in _SHARED:
                x = n.args[0]
                if _is_float(x):
                    n.meta['quantization_annotation'] = QuantizationAnnotation(
                        {x: self._input(x)}, SharedQuantizationSpec((x, n)), _annotated=True)
                continue
            else:
                continue
            if fused is not None and 'quantization_annotation' not in fused.meta:
                fused.meta['quantization_annotation'] = QuantizationAnnotation({}, output_spec(fused), _annotated=True)
        return model

    def validate(self, model: GraphModule) -> None:
        pass
