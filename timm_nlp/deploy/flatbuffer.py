"""Reading and editing TFLite flatbuffers (LiteRT's schema): the op list, which ops compute in float, the int8 model
interface, the ops the converter decomposes fused back into the one int8 kernel TFLite Micro has for them, long
softmax rows given an int16 output, and the activation memory of the graph."""
import copy
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import flatbuffers
import numpy as np
from ai_edge_litert import _pywrap_modify_model_interface as modify_interface
from ai_edge_litert import schema_py_generated as schema

from timm_nlp.layers.export_ops import INT8_SOFTMAX_MAX_ROW

__all__ = [
    'OpInfo', 'op_list', 'op_census', 'float_ops', 'io_quantization', 'to_int8_io', 'widen_softmax',
    'fuse_log_softmax', 'fuse_l2_normalization', 'fuse_split', 'live_bytes_peak',
]

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith('_')}
_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith('_')}
_ALIGN = 16  # TFLite Micro's buffer alignment
_ITEMSIZE = {'INT8': 1, 'UINT8': 1, 'BOOL': 1, 'INT16': 2, 'FLOAT16': 2, 'FLOAT32': 4, 'INT32': 4, 'INT64': 8}


def _model(flat: bytes) -> 'schema.ModelT':
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flat, 0))


def _is_const(model, tensor) -> bool:
    b = tensor.buffer
    return b < len(model.buffers) and model.buffers[b].data is not None and len(model.buffers[b].data) > 0


@dataclass
class OpInfo:
    """One operator of the main subgraph: its name and the (type, shape) of its activation inputs and outputs."""
    name: str
    inputs: List[Tuple[str, Tuple[int, ...]]]
    outputs: List[Tuple[str, Tuple[int, ...]]]

    @property
    def is_float(self) -> bool:
        """Whether it computes in float: a float activation in or out (a DEQUANTIZE, a QUANTIZE of a float, an op
        between them; a QUANTIZE from int16 to int8 is an integer requantisation)."""
        return any(t in ('FLOAT32', 'FLOAT16') for t, _ in self.inputs + self.outputs)


def op_list(flat: bytes) -> List[OpInfo]:
    """The operators of the main subgraph in execution order."""
    model = _model(flat)
    sg = model.subgraphs[0]
    ops = []
    for op in sg.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = _OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), 'CUSTOM')

        def acts(ids):
            return [(_TYPE_NAMES[sg.tensors[i].type], tuple(sg.tensors[i].shape)) for i in ids
                    if i >= 0 and not _is_const(model, sg.tensors[i])]
        ops.append(OpInfo(name, acts(op.inputs), acts(op.outputs)))
    return ops


def op_census(flat: bytes) -> Dict[str, int]:
    """How many of each operator, float ones counted apart (``'SOFTMAX (float)'``)."""
    out: Dict[str, int] = {}
    for op in op_list(flat):
        key = f'{op.name} (float)' if op.is_float and op.name not in ('QUANTIZE', 'DEQUANTIZE') else op.name
        out[key] = out.get(key, 0) + 1
    return out


def float_ops(flat: bytes) -> List[str]:
    """The ops that compute in float, QUANTIZE and DEQUANTIZE included: none in a fully int8 model."""
    return [op.name for op in op_list(flat) if op.is_float]


def io_quantization(flat: bytes) -> Dict[str, List[Tuple[str, Tuple[int, ...], float, int]]]:
    """``{'inputs': [...], 'outputs': [...]}``: (type, shape, scale, zero point) of each model input and output."""
    model = _model(flat)
    sg = model.subgraphs[0]

    def describe(i):
        t = sg.tensors[i]
        q = t.quantization
        scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else 1.
        zero = int(q.zeroPoint[0]) if q is not None and q.zeroPoint is not None and len(q.zeroPoint) else 0
        return _TYPE_NAMES[t.type], tuple(int(d) for d in t.shape), scale, zero
    return dict(inputs=[describe(i) for i in sg.inputs], outputs=[describe(i) for i in sg.outputs])


def to_int8_io(flat: bytes) -> bytes:
    """The model with int8 inputs and outputs: the QUANTIZE after each float input and the DEQUANTIZE before each
    float output removed (TFLite's ``modify_model_interface``), their scales on the interface."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, 'in.tflite'), os.path.join(d, 'out.tflite')
        with open(src, 'wb') as f:
            f.write(flat)
        if modify_interface.modify_model_interface(src, dst, schema.TensorType.INT8, schema.TensorType.INT8) != 0:
            raise RuntimeError('TFLite could not give the model an int8 interface.')
        with open(dst, 'rb') as f:
            return f.read()


def _opcode(model, code: int, version: int = 1) -> int:
    for i, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
            oc.version = max(oc.version, version)
            return i
    oc = schema.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _new_tensor(sg, like, type_: int, suffix: bytes, scale: Optional[float] = None, zero_point: int = 0) -> int:
    """A tensor of ``like``'s shape appended to the subgraph ``sg``; returns its index."""
    t = schema.TensorT()
    t.shape, t.type, t.buffer, t.name = copy.copy(like.shape), type_, 0, (like.name or b'') + suffix
    if scale is not None:
        t.quantization = schema.QuantizationParametersT()
        t.quantization.scale, t.quantization.zeroPoint = [scale], [zero_point]
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def _op(model, code: int, inputs: List[int], outputs: List[int], version: int = 1) -> 'schema.OperatorT':
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = _opcode(model, code, version), inputs, outputs
    return op


def _rewrite(flat: bytes, rewrite) -> Tuple[bytes, int]:
    """Every op of every subgraph replaced by the ops ``rewrite(model, subgraph, op)`` returns (None: kept); returns
    the model and how many ops were rewritten."""
    model = _model(flat)
    rewritten = 0
    for sg in model.subgraphs:
        ops = []
        for op in sg.operators:
            new = rewrite(model, sg, op)
            ops += [op] if new is None else new
            rewritten += new is not None
        sg.operators = ops
    return (_pack(model), rewritten) if rewritten else (flat, 0)


def _pack(model) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b'TFL3')
    return bytes(builder.Output())


def _drop_unused_tensors(model) -> None:
    """Remove the tensors no op or subgraph interface refers to (what a fusion left behind): TFLite Micro would
    still allocate them, all at once, in its arena's head."""
    for k, sg in enumerate(model.subgraphs):
        used = set(sg.inputs) | set(sg.outputs)
        for op in sg.operators:
            used.update(op.inputs, op.outputs, op.intermediates if op.intermediates is not None else ())
        index = {old: new for new, old in enumerate(i for i in range(len(sg.tensors)) if i in used)}
        index[-1] = -1
        sg.tensors = [t for i, t in enumerate(sg.tensors) if i in used]
        for op in sg.operators:
            op.inputs, op.outputs = [index[i] for i in op.inputs], [index[i] for i in op.outputs]
            if op.intermediates is not None:
                op.intermediates = [index[i] for i in op.intermediates]
        sg.inputs, sg.outputs = [index[i] for i in sg.inputs], [index[i] for i in sg.outputs]
        for signature in model.signatureDefs or []:
            if signature.subgraphIndex == k:
                for t in (signature.inputs or []) + (signature.outputs or []):
                    t.tensorIndex = index[t.tensorIndex]


def _builtin(model, op) -> int:
    oc = model.operatorCodes[op.opcodeIndex]
    return max(oc.builtinCode, oc.deprecatedBuiltinCode)


def _readers_and_producers(sg) -> Tuple[Dict[int, int], Dict[int, 'schema.OperatorT']]:
    """How many ops read each tensor of the subgraph ``sg``, and the op that writes each."""
    readers: Dict[int, int] = {}
    for op in sg.operators:
        for i in op.inputs:
            readers[i] = readers.get(i, 0) + 1
    return readers, {o: op for op in sg.operators for o in op.outputs}


def widen_softmax(flat: bytes, max_row: int = INT8_SOFTMAX_MAX_ROW) -> Tuple[bytes, int]:
    """Every int8 SOFTMAX over rows longer than ``max_row`` as SOFTMAX with an int16 output (scale 1/65536, zero
    point -32768, the kernel's fixed quantisation) -> QUANTIZE to its int8 output (its calibrated scale): TFLite
    Micro's int8 output path aborts where a row's exponentials sum to 512 or more, its int16 output path sums up to
    65,536. Returns the model and how many softmaxes were widened."""
    def rewrite(model, sg, op):
        t_in, t_out = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
        if _builtin(model, op) != schema.BuiltinOperator.SOFTMAX or t_in.type != schema.TensorType.INT8 \
                or t_in.shape[-1] <= max_row:
            return None
        wide = _new_tensor(sg, t_out, schema.TensorType.INT16, b'_i16', 1 / 65536, -32768)
        q = _op(model, schema.BuiltinOperator.QUANTIZE, [wide], [op.outputs[0]])
        op.outputs = [wide]
        return [op, q]
    return _rewrite(flat, rewrite)


def fuse_log_softmax(flat: bytes) -> Tuple[bytes, int]:
    """Every int8 LOG of an int8 SOFTMAX (its only reader) as one LOG_SOFTMAX of the softmax's input, into the LOG's
    output (quantised as that kernel requires: scale 16/256, zero point 127): TFLite Micro's LOG is float only, its
    LOG_SOFTMAX int8, and the converter decomposes ``log_softmax``. Returns the model and how many were fused."""
    model = _model(flat)
    fused = 0
    for sg in model.subgraphs:
        readers, producer = _readers_and_producers(sg)
        pairs = {}
        for op in sg.operators:
            src = producer.get(op.inputs[0])
            if _builtin(model, op) == schema.BuiltinOperator.LOG and src is not None and \
                    _builtin(model, src) == schema.BuiltinOperator.SOFTMAX and readers[op.inputs[0]] == 1 and \
                    sg.tensors[op.inputs[0]].type == schema.TensorType.INT8 and src.builtinOptions.beta == 1:
                pairs[id(op)], pairs[id(src)] = src, None
        ops = []
        for op in sg.operators:
            if id(op) not in pairs:
                ops.append(op)
            elif pairs[id(op)] is not None:  # the LOG: one LOG_SOFTMAX in its place, the SOFTMAX dropped
                lsm = _op(model, schema.BuiltinOperator.LOG_SOFTMAX, [pairs[id(op)].inputs[0]], list(op.outputs))
                lsm.builtinOptionsType = schema.BuiltinOptions.LogSoftmaxOptions
                lsm.builtinOptions = schema.LogSoftmaxOptionsT()
                ops.append(lsm)
                fused += 1
        sg.operators = ops
    _drop_unused_tensors(model)
    return (_pack(model), fused) if fused else (flat, 0)


def fuse_l2_normalization(flat: bytes) -> Tuple[bytes, int]:
    """Every int8 ``x * RSQRT([MAXIMUM](SUM(x * x)))`` over the last axis (``timm_nlp.layers.export_ops.L2Normalize``)
    whose output is quantised as TFLite's int8 L2_NORMALIZATION writes (scale 1/128, zero point 0) as that one op:
    the converter decomposes the norm, and TFLite Micro's RSQRT cannot be quantised for it (its range reaches
    ``1 / eps``). Returns the model and how many were fused."""
    model = _model(flat)
    fused = 0
    for sg in model.subgraphs:
        readers, producer = _readers_and_producers(sg)

        def chain(t: int, *codes: int):
            """The ops that produce ``t`` through ``codes`` (first the producer of ``t``), each read once."""
            ops = []
            for code in codes:
                op = producer.get(t)
                if op is None or _builtin(model, op) != code or readers.get(t) != 1:
                    return None
                ops.append(op)
                t = op.inputs[0]
            return ops

        dropped, norms = set(), {}
        for op in sg.operators:
            out = sg.tensors[op.outputs[0]]
            q = out.quantization
            if _builtin(model, op) != schema.BuiltinOperator.MUL or out.type != schema.TensorType.INT8 or \
                    q is None or list(q.scale) != [1 / 128] or list(q.zeroPoint) != [0]:
                continue
            for x, r in (op.inputs, op.inputs[::-1]):
                ops = chain(r, schema.BuiltinOperator.RSQRT, schema.BuiltinOperator.MAXIMUM,
                            schema.BuiltinOperator.SUM, schema.BuiltinOperator.MUL) or \
                    chain(r, schema.BuiltinOperator.RSQRT, schema.BuiltinOperator.SUM, schema.BuiltinOperator.MUL)
                shape = list(sg.tensors[x].shape)
                if ops and list(ops[-1].inputs) == [x, x] and \
                        list(sg.tensors[ops[-2].outputs[0]].shape) == shape[:-1] + [1]:
                    dropped.update(id(o) for o in ops)
                    norm = _op(model, schema.BuiltinOperator.L2_NORMALIZATION, [x], list(op.outputs))
                    norm.builtinOptionsType = schema.BuiltinOptions.L2NormOptions
                    norm.builtinOptions = schema.L2NormOptionsT()
                    norms[id(op)] = norm
                    break
        sg.operators = [norms.get(id(op), op) for op in sg.operators if id(op) not in dropped]
        fused += len(norms)
    _drop_unused_tensors(model)
    return (_pack(model), fused) if fused else (flat, 0)


def _const_values(model, tensor) -> Optional[np.ndarray]:
    """The values of a constant int32 tensor (None for any other)."""
    if tensor.type != schema.TensorType.INT32 or not _is_const(model, tensor):
        return None
    return np.frombuffer(bytes(bytearray(model.buffers[tensor.buffer].data)), np.int32)


def _const_int32(model, sg, values: List[int], name: bytes) -> int:
    """A constant int32 vector appended to the subgraph ``sg``; returns its index."""
    buffer = schema.BufferT()
    buffer.data = list(np.asarray(values, np.int32).tobytes())
    model.buffers.append(buffer)
    t = schema.TensorT()
    t.shape, t.type, t.buffer, t.name = [len(values)], schema.TensorType.INT32, len(model.buffers) - 1, name
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def fuse_split(flat: bytes) -> Tuple[bytes, int]:
    """Every run of consecutive SLICEs that cut one activation into its consecutive pieces along the first axis (the
    converter's form of ``torch.split``) as one SPLIT_V: the same outputs, one op instead of hundreds (a query chunk
    of ``ChunkedAttention`` each), for which TFLite Micro would keep a node and constants each. Returns the model and
    how many were fused."""
    model = _model(flat)
    fused = 0
    for sg in model.subgraphs:
        def cut(op) -> Optional[Tuple[int, int, int]]:
            """(input, first row, rows) of a SLICE of whole rows, else None."""
            if _builtin(model, op) != schema.BuiltinOperator.SLICE:
                return None
            shape = list(sg.tensors[op.inputs[0]].shape)
            begin, size = (_const_values(model, sg.tensors[i]) for i in op.inputs[1:3])
            if begin is None or size is None or not shape or any(begin[1:]) or \
                    any(s not in (-1, d) for s, d in zip(size[1:], shape[1:])):
                return None
            return op.inputs[0], int(begin[0]), int(shape[0] - begin[0] if size[0] == -1 else size[0])

        runs: List[List[Tuple[int, int, int, 'schema.OperatorT']]] = [[]]
        for op in sg.operators:
            c = cut(op)
            run = runs[-1]
            if c is not None and run and c[0] == run[-1][0] and c[1] == run[-1][1] + run[-1][2]:
                run.append((*c, op))
            else:
                runs.append([(*c, op)] if c is not None and c[1] == 0 else [])
        splits, dropped = {}, set()
        for run in runs:
            if len(run) < 2 or run[-1][1] + run[-1][2] != sg.tensors[run[0][0]].shape[0]:
                continue
            sizes = [rows for _, _, rows, _ in run]
            int8 = sg.tensors[run[0][0]].type == schema.TensorType.INT8
            split = _op(model, schema.BuiltinOperator.SPLIT_V, [
                run[0][0], _const_int32(model, sg, sizes, b'split_sizes'), _const_int32(model, sg, [0], b'split_axis')],
                [op.outputs[0] for *_, op in run], version=2 if int8 else 1)
            split.builtinOptionsType = schema.BuiltinOptions.SplitVOptions
            split.builtinOptions = schema.SplitVOptionsT()
            split.builtinOptions.numSplits = len(run)
            splits[id(run[0][3])] = split
            dropped.update(id(op) for *_, op in run)
        sg.operators = [splits.get(id(op), op) for op in sg.operators if id(op) in splits or id(op) not in dropped]
        fused += len(splits)
    _drop_unused_tensors(model)
    return (_pack(model), fused) if fused else (flat, 0)


def _lifetimes(model, sg) -> Dict[int, Tuple[int, int, int]]:
    """Every activation tensor of the subgraph ``sg``: its bytes (16-byte aligned, as TFLite Micro allocates), the op
    that writes it (0 for a model input) and its last reader (the end for a model output), as TFLite Micro's planner
    sees them."""
    first: Dict[int, int] = {i: 0 for i in sg.inputs}
    last: Dict[int, int] = {}
    for k, op in enumerate(sg.operators):
        for i in op.inputs:
            if i >= 0 and not _is_const(model, sg.tensors[i]):
                last[i] = k
        for i in op.outputs:
            first.setdefault(i, k)
            last.setdefault(i, k)
    for i in sg.outputs:
        last[i] = len(sg.operators)
    spans = {}
    for i, k in first.items():
        t = sg.tensors[i]
        nbytes = int(np.prod(t.shape)) * _ITEMSIZE.get(_TYPE_NAMES[t.type], 4)
        spans[i] = (-(-nbytes // _ALIGN) * _ALIGN, k, last.get(i, k))
    return spans


def live_bytes_peak(flat: bytes) -> Tuple[int, Optional[int]]:
    """The largest sum of live activation bytes over the ops (each tensor 16-byte aligned, live from the op that
    writes it to its last reader) and the op where it occurs: the least memory any plan of the activations needs,
    which TFLite Micro's planner reaches on these graphs."""
    model = _model(flat)
    sg = model.subgraphs[0]
    delta = np.zeros(len(sg.operators) + 2, np.int64)
    for nbytes, first, last in _lifetimes(model, sg).values():
        delta[first] += nbytes
        delta[last + 1] -= nbytes
    live = np.cumsum(delta)[:len(sg.operators)]
    if not len(live):
        return 0, None
    where = int(live.argmax())
    return int(live[where]), where
