"""Model cost accounting: multiply-accumulates (attention included), layer-by-layer activation memory, and the
measured peak of real execution to check the counts against.

Layers with internal steps say what they hold (``timm_nlp.layers.protocol.CompoundLayer``); the profiler asks them.
Patch-based execution's costs are in ``timm_nlp.patching``, whole-model profiles and their tables in
``timm_nlp.tools.profile``.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torchvision.ops  # noqa: F401  registers torch.ops.torchvision (deform_conv2d's FLOP count)
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.resnet import BasicBlock, Bottleneck

from ._modules import meta_copy
from .export_model import DEFAULT_CHUNK, TAIL_BYTES_PER_OP, export_form_model
from .layers.export_ops import INT8_SOFTMAX_MAX_ROW, ExportedOps, TwoSchedules
from .layers.protocol import CompoundLayer

__all__ = [
    'count_macs', 'activation_profile', 'ActivationProfile', 'LayerMemory', 'ACCOUNTINGS', 'DTYPES', 'itemsize_of',
    'measured_peak_bytes', 'storage_key', 'tflm_profile', 'choose_schedules', 'deployed_form',
]


def _deform_conv2d_flops(x_shape, weight_shape, offset_shape, mask_shape, bias_shape, *args, out_shape=None, **kw):
    """FLOPs of torchvision's deform_conv2d: those of the convolution it computes (bilinear sampling excluded)."""
    batch, out_ch, out_h, out_w = out_shape
    _, in_per_group, kh, kw_ = weight_shape
    return 2 * batch * out_ch * out_h * out_w * in_per_group * kh * kw_


def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass: convolutions, linear layers and matmuls, attention included.

    Runs on a meta-device copy in eval mode (no memory, any size) under the math SDPA backend, because torch's
    FlopCounterMode does not see inside the fused CPU attention kernel; deformable convolutions count as
    convolutions. Element-wise operations, normalisation and pooling are not counted.
    """
    meta = meta_copy(model)
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.torchvision.deform_conv2d: _deform_conv2d_flops})
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        meta(torch.empty(batch_size, *input_size, device='meta'))
    return counter.get_total_flops() // 2


@dataclass
class LayerMemory:
    """One step of layer-by-layer execution: its input, its output, the map it computes with (a pooling layer's
    importance map, a deformable conv's offsets) and the tensors held across it that are none of these."""
    name: str
    kind: str
    out_shape: Tuple[int, ...]
    in_bytes: int
    out_bytes: int
    operand_bytes: int
    held_bytes: int
    inplace: bool = False

    @property
    def live_bytes(self) -> int:
        """Input and output (one buffer, the larger, for an in-place step), operand and held tensors."""
        io = max(self.in_bytes, self.out_bytes) if self.inplace else self.in_bytes + self.out_bytes
        return io + self.operand_bytes + self.held_bytes


@dataclass
class ActivationProfile:
    """Activation memory of one forward pass under layer-by-layer execution, counted by ``accounting``."""
    layers: List[LayerMemory]
    accounting: str = 'layers'

    @property
    def peak_bytes(self) -> int:
        return max(layer.live_bytes for layer in self.layers)

    @property
    def peak_layer(self) -> LayerMemory:
        return max(self.layers, key=lambda layer: layer.live_bytes)

    @property
    def largest_map_bytes(self) -> int:
        return max(max(layer.in_bytes, layer.out_bytes, layer.operand_bytes) for layer in self.layers)


def _tensors(x) -> List[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _nbytes(x, itemsize: int) -> int:
    return sum(t.numel() for t in _tensors(x)) * itemsize


def storage_key(t: torch.Tensor) -> int:
    """An identity of the storage of ``t`` that meta tensors have too (they have no data pointer): torch's private
    ``_cdata`` handle of the untyped storage (tests/test_profiler.py checks it tells storages apart)."""
    return t.untyped_storage()._cdata


def _held_bytes(held: List[Tuple[torch.Tensor, ...]], inputs, output, itemsize: int) -> int:
    """Bytes of the held tensors, each storage once, less those the step takes or gives (counted as such)."""
    seen = {storage_key(t) for t in _tensors((inputs, output))}
    total = 0
    for t in _tensors(held):
        key = storage_key(t)
        if key not in seen:
            seen.add(key)
            total += _nbytes(t, itemsize)
    return total


ACCOUNTINGS = ('layers', 'mcunet', 'inplace-dw', 'tflm')
DTYPES = {'float32': 4, 'float16': 2, 'bfloat16': 2, 'int8': 1}


def itemsize_of(dtype: Union[torch.dtype, str]) -> int:
    """Bytes per activation element of ``dtype`` (a torch dtype or its name, or 'int8')."""
    name = dtype if isinstance(dtype, str) else str(dtype).replace('torch.', '')
    if name not in DTYPES:
        raise ValueError(f"activation memory is counted for {', '.join(DTYPES)}, not '{name}'.")
    return DTYPES[name]


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels == \
        module.out_channels


def _residual_blocks(model: nn.Module) -> Dict[nn.Module, Tuple[List[nn.Module], bool]]:
    """timm's residual blocks: their main-path convs in order, and whether their shortcut is a projection."""
    blocks = {}
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            convs = [m.conv1, m.conv2] + ([m.conv3] if isinstance(m, Bottleneck) else [])
            blocks[m] = (convs, m.downsample is not None)
        elif isinstance(m, InvertedResidual) and m.has_skip:
            blocks[m] = ([m.conv_pw, m.conv_dw, m.conv_pwl], False)
        elif isinstance(m, DepthwiseSeparableConv) and m.has_skip:
            blocks[m] = ([m.conv_dw, m.conv_pw], False)
    return blocks


def activation_profile(
        model: nn.Module,
        input_size: Tuple[int, int, int] = (3, 224, 224),
        batch_size: int = 1,
        dtype: Union[torch.dtype, str] = torch.float32,
        accounting: str = 'layers',
) -> ActivationProfile:
    """Per-step activation memory of an inference forward pass (meta device, nothing allocated).

    Accountings (``docs/memory.md``):

    - ``layers``: a step is a leaf module (a conv, a norm, an activation, a linear layer...) and holds its input and
      its output activation.
    - ``mcunet``: the rule of MCUNet's ``count_peak_activation_size``: norms and activations are folded into their
      conv, so a step is a conv or linear layer (input and output) or a pooling layer; a block with an identity
      shortcut also holds its input during its middle convs (a MobileNetV2 block's depthwise conv), one with a
      projection shortcut during every conv after its first (the projection still needs it).
    - ``inplace-dw``: ``mcunet`` with depthwise convs computed in place, as TinyEngine does (one buffer, the larger
      of input and output).
    - ``tflm``: the model as it is deployed (``timm_nlp.export_model.export_form_model``) as TensorFlow Lite Micro
      runs it: every op of its graph a step, holding every tensor that is live at it (``tflm_profile``), so that the
      peak predicts the head of TFLite Micro's arena.

    In every accounting, a layer with internal steps (a ``CompoundLayer``: the pooling layers, dynamic and
    deformable convs) is one step too, after its internal steps, whose live memory adds the map it computes with
    (its ``operand_numel``: a pool's importance map, a deformable conv's offsets). While its internal steps run, its
    input stays live, and so do the maps it computed before them (``held_numel``, ``held_outputs``): a step counts
    these as held unless it takes or gives them (same storage), so a held tensor is never counted twice. ``dtype``
    may be ``int8`` (one byte per element): the shapes are those of the float model.
    """
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting '{accounting}' is not one of {', '.join(ACCOUNTINGS)}.")
    itemsize = itemsize_of(dtype)
    if accounting == 'tflm':
        return tflm_profile(deployed_form(meta_copy(model), input_size), input_size, itemsize)
    meta = meta_copy(model).to(dtype=torch.float32)
    folded = accounting != 'layers'
    step_types = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    layers: List[LayerMemory] = []
    modules: List[nn.Module] = []
    held: List[Tuple[torch.Tensor, ...]] = []
    depths: List[int] = []
    hooks = []

    def step_hook(name: str, compound: bool = False):
        def hook(module, inputs, output):
            operand = 0
            if compound:
                del held[depths.pop():]
                output = module.step_output(output)
                operand = module.operand_numel(inputs[0], output) * itemsize
            layers.append(LayerMemory(
                name, type(module).__name__, tuple(output.shape), _nbytes(inputs, itemsize), _nbytes(output, itemsize),
                operand, _held_bytes(held, inputs, output, itemsize),
                inplace=accounting == 'inplace-dw' and _is_depthwise(module)))
            modules.append(module)
        return hook

    def enter(module, inputs):
        depths.append(len(held))
        held.append(inputs)
        extra = module.held_numel(inputs[0])
        if extra:
            held.append((inputs[0].new_empty(extra),))

    def block_hooks(block: nn.Module, convs: List[nn.Module], projection: bool):
        start = []

        def pre(module, inputs):
            start.append((len(layers), inputs[0]))

        def post(module, inputs, output):
            first, x = start.pop()
            steps = [i for i in range(first, len(layers)) if any(modules[i] is c for c in convs)]
            for i in steps[1:] if projection else steps[1:-1]:
                layers[i].held_bytes += _nbytes(x, itemsize)
        return [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]

    for name, module in meta.named_modules():
        if isinstance(module, CompoundLayer):
            hooks.append(module.register_forward_pre_hook(enter))
            hooks.append(module.register_forward_hook(step_hook(name, compound=True)))
            for child in module.held_outputs:  # kept while the later internal steps run
                hooks.append(module.get_submodule(child).register_forward_hook(
                    lambda m, inputs, output: held.append((output,))))
        elif not any(True for _ in module.children()) and name and (not folded or isinstance(module, step_types)):
            hooks.append(module.register_forward_hook(step_hook(name)))
    if folded:
        for block, (convs, projection) in _residual_blocks(meta).items():
            hooks += block_hooks(block, convs, projection)
    try:
        with torch.no_grad():
            meta(torch.empty(batch_size, *input_size, device='meta'))
    finally:
        for h in hooks:
            h.remove()
    return ActivationProfile(layers, accounting)


def measured_peak_bytes(fn: Callable[[], object]) -> int:
    """The peak of the bytes ``fn`` holds allocated on the CPU while it runs, from torch.profiler's memory events
    (every allocation and free of the CPU allocator, in order; the measurement of real execution that the counts
    are checked against). What existed before the call is not counted; what it returns is."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# aten ops the TFLite graph has no tensor of its own for: views and reshapes (layout, which the converter plans
# away), activations fused into the op before them, folded (identity) norms, copies
_TFLM_ALIASES = {
    'view', '_unsafe_view', 'reshape', 'unsqueeze', 'squeeze', 'expand', 'permute', 'transpose', 't', 'alias',
    'flatten', 'unflatten', 'detach', 'clone', 'contiguous', 'dropout', 'relu', 'relu_', 'hardtanh', 'hardtanh_',
    'clamp', 'clamp_min', '_native_batch_norm_legit_no_training', 'native_batch_norm', 'batch_norm', 'lift_fresh',
    'lift_fresh_copy',
    '_to_copy', 'select'}
_TFLM_ALIGN = 16  # TFLite Micro's buffer alignment
# padded convs and pools, and the argument that holds their padding
_TFLM_PADDED = {'convolution': 4, 'max_pool2d_with_indices': 3, 'avg_pool2d': 3}


class _TFLMTrace(TorchDispatchMode):
    """Records every aten op of a forward on the meta device as the TFLite graph has it: its input and output
    buffers (a view or fused op is its input's buffer; an op on the same inputs as an earlier one is that one, as the
    converter merges common subexpressions: a row of patches' shared slice, a patch's prefix in both passes; what no
    activation flows into, the weights among them, is a constant), with the module it ran in."""

    def __init__(self, itemsize: int):
        super().__init__()
        self.itemsize = itemsize
        self.buffer: Dict[int, int] = {}  # tensor (its id; views are tensors of their own) -> buffer
        self.alive: List[torch.Tensor] = []  # every tensor seen, so that no id is reused
        self.sizes: List[int] = []
        self.ops: List[Tuple[str, str, List[int], List[int], Tuple[int, ...]]] = []
        self.computed: Dict[tuple, List[int]] = {}
        self.module = ['']
        self.exported = 0  # depth inside an ``ExportedOps`` module, whose ops are its declared ones

    @staticmethod
    def explicit_pad(name: str, args: tuple) -> bool:
        """Whether TFLite needs a PAD op before this padded conv or pool: its padding is neither VALID (none) nor
        what SAME pads before the first pixel, for the same output size."""
        x = args[0]
        if name == 'convolution':
            kernel, stride, padding, dilation = args[1].shape[-2:], args[3], args[4], args[5]
        else:  # trailing arguments at their defaults are left out
            kernel = args[1]
            stride = args[2] if len(args) > 2 and args[2] else kernel
            padding = args[3] if len(args) > 3 else (0, 0)
            dilation = args[4] if name == 'max_pool2d_with_indices' and len(args) > 4 else (1, 1)
            kernel, stride, padding, dilation = (v if len(v) == 2 else (v[0], v[0])
                                                 for v in (kernel, stride, padding, dilation))
        for size, k, s, p, d in zip(x.shape[-2:], kernel, stride, padding, dilation):
            if p == 0:
                continue
            out = (size + 2 * p - d * (k - 1) - 1) // s + 1
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            if out != -(-size // s) or total // 2 != p:
                return True
        return False

    def new_buffer(self, t: torch.Tensor, itemsize: int) -> int:
        self.sizes.append(-(-t.numel() * itemsize // _TFLM_ALIGN) * _TFLM_ALIGN)
        self.name(t, len(self.sizes) - 1)
        return len(self.sizes) - 1

    def signature(self, a):
        """An argument as the converter tells ops apart: an activation by its buffer, any other tensor (a weight) by
        itself, lists by their items."""
        if isinstance(a, torch.Tensor):
            return ('buffer', self.buffer[id(a)]) if id(a) in self.buffer else ('tensor', id(a))
        if isinstance(a, (list, tuple)):
            return tuple(self.signature(v) for v in a)
        return a

    def leave_exported(self, m: ExportedOps, inputs: tuple, output: torch.Tensor) -> None:
        """The ops ``m`` is exported as, one after another from its inputs, each a buffer the size of its output."""
        ins = [self.buffer[id(t)] for t in _tensors(inputs) if id(t) in self.buffer]
        if not ins:
            return
        for op in m.OPS:
            made = [self.new_buffer(output, self.itemsize)]
            self.ops.append((self.module[-1], op.lower(), ins, made, tuple(output.shape)))
            ins = made

    def name(self, t: torch.Tensor, buffer: int) -> None:
        self.buffer[id(t)] = buffer
        self.alive.append(t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        ins = [self.buffer[id(t)] for t in _tensors(list(args)) if id(t) in self.buffer]
        outs = [t for t in _tensors(out) if t.dtype.is_floating_point]
        if not ins or self.exported:  # computed from constants only (a constant), or an exported op's step
            return out
        itemsize = self.itemsize
        if name in _TFLM_ALIASES and outs:
            for t in outs:
                self.name(t, ins[0])
            return out
        key = (name,) + tuple(self.signature(a) for a in list(args) + sorted((kwargs or {}).items()))
        if key in self.computed:  # the converter computes an op of the same inputs once (common subexpressions)
            for t, b in zip(outs, self.computed[key]):
                self.name(t, b)
            return out
        if name in _TFLM_PADDED and self.explicit_pad(name, args):
            # TFLite's SAME padding puts the odd pixel after, PyTorch's before: a PAD op copies the input first
            pad = args[_TFLM_PADDED[name]]
            x = args[0]
            padded = len(self.sizes)
            self.sizes.append(-(-x.numel() // (x.shape[-2] * x.shape[-1]) * (x.shape[-2] + 2 * pad[0])
                                * (x.shape[-1] + 2 * pad[-1]) * itemsize // _TFLM_ALIGN) * _TFLM_ALIGN)
            self.ops.append((self.module[-1], 'pad', ins[:1], [padded], ()))
            ins = [padded] + ins[1:]
        if name == 'slice' and tuple(outs[0].shape) == tuple(args[0].shape):  # a whole axis: the tensor itself
            self.name(outs[0], ins[0])
            return out
        wide = name == '_softmax' and itemsize == 1 and outs[0].shape[-1] > INT8_SOFTMAX_MAX_ROW
        made = [self.new_buffer(t, 2 if wide else itemsize) for t in outs]
        self.ops.append((self.module[-1], name, ins, made, tuple(outs[0].shape) if outs else ()))
        if wide:  # an int16 output, requantised to int8 (``timm_nlp.deploy.flatbuffer.widen_softmax``)
            made = [self.new_buffer(outs[0], itemsize)]
            self.ops.append((self.module[-1], 'quantize', self.ops[-1][3], made, tuple(outs[0].shape)))
        self.computed[key] = made
        return out


def tflm_profile(model: nn.Module, input_size: Tuple[int, int, int], itemsize: int = 1) -> 'ActivationProfile':
    """The ops of ``model`` (on the meta device) as TensorFlow Lite Micro plans them: a buffer per op output (views,
    fused activations and folded norms none of their own), the input's from the start, each until its last reader,
    the output's to the end, each aligned to 16 bytes; an ``ExportedOps`` module as the ops it declares; a softmax over
    rows longer than TFLite Micro's int8 output takes writes int16 (2 bytes), then its int8 copy. A step per op
    holds every live buffer, so the peak is the least arena head any planner needs (which TFLite Micro's greedy planner
    reaches on these graphs)."""
    meta = meta_copy(model)
    trace = _TFLMTrace(itemsize)
    names = {m: n for n, m in meta.named_modules()}

    def enter(m: nn.Module, inputs: tuple) -> None:
        trace.module.append(names.get(m, trace.module[-1]))  # a view (patch-based execution) is its module
        trace.exported += isinstance(m, ExportedOps)

    def leave(m: nn.Module, inputs: tuple, output) -> None:
        trace.module.pop()
        if isinstance(m, ExportedOps):
            trace.exported -= 1
            if not trace.exported:
                trace.leave_exported(m, inputs, output)
    hooks = [h for m in meta.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    x = torch.empty(1, *input_size, device='meta')
    trace.new_buffer(x, itemsize)
    try:
        with torch.no_grad(), trace:
            y = meta(x)
    finally:
        for h in hooks:
            h.remove()
    n = len(trace.ops)
    born = {0: 0}
    last = {}
    for k, (_, _, ins, made, _) in enumerate(trace.ops):
        for b in ins:
            last[b] = k
        for b in made:
            born.setdefault(b, k)
            last.setdefault(b, k)
    for t in _tensors(y):
        if id(t) in trace.buffer:
            last[trace.buffer[id(t)]] = n - 1
    delta = [0] * (n + 1)
    for b, k in born.items():
        delta[k] += trace.sizes[b]
        delta[last.get(b, k) + 1] -= trace.sizes[b]
    layers, live = [], 0
    for k, (module, name, ins, made, shape) in enumerate(trace.ops):
        live += delta[k]
        in_bytes = sum(trace.sizes[b] for b in set(ins))
        out_bytes = sum(trace.sizes[b] for b in made)
        layers.append(LayerMemory(module or name, name, shape, in_bytes, out_bytes, 0, live - in_bytes - out_bytes))
    return ActivationProfile(layers, 'tflm')


def choose_schedules(model: nn.Module, input_size: Tuple[int, int, int],
                     deployed: Optional[nn.Module] = None) -> int:
    """The export forms of ``model`` with two schedules (``TwoSchedules``) lean where that lowers the arena of what
    is deployed (``deployed``, sharing its modules; default ``model``), in place: from all joint, the form
    that holds the counted peak turns lean while the arena (the ``tflm`` count's peak plus ``TAIL_BYTES_PER_OP`` an
    op, the lean schedule's extra ops adding to the runtime's tail) falls. Returns how many are lean.

    Args:
        model: A model holding export forms (``export_form_model``).
        input_size: Its input (C, H, W).
        deployed: What is deployed of ``model``, whose arena decides.
    """
    forms = [m for m in model.modules() if isinstance(m, TwoSchedules)]
    if not forms:
        return 0
    target = deployed if deployed is not None else model
    names = {id(m): n for n, m in target.named_modules()}
    paths = [names.get(id(f)) for f in forms]

    def arena() -> Tuple[ActivationProfile, int]:
        profile = tflm_profile(target, input_size)
        return profile, profile.peak_bytes + TAIL_BYTES_PER_OP * len(profile.layers)
    for form in forms:
        form.lean = False
    profile, best = arena()
    while True:
        peak = profile.peak_layer.name
        holders = [f for f, path in zip(forms, paths)
                   if not f.lean and path is not None and (peak == path or peak.startswith(path + '.'))]
        if not holders:
            break
        holders[0].lean = True
        trial, cost = arena()
        if cost >= best:
            holders[0].lean = False
            break
        profile, best = trial, cost
    return sum(form.lean for form in forms)


def deployed_form(model: nn.Module, input_size: Tuple[int, int, int], chunk: Optional[int] = DEFAULT_CHUNK,
                  widen: bool = True) -> nn.Module:
    """``model`` as it is deployed whole-map: ``export_form_model`` with each form's schedule chosen
    (``choose_schedules``).

    Args:
        model: The model (copied).
        input_size: Its input (C, H, W).
        chunk: Query rows at a time of the non-local attention over the most tokens.
        widen: Pad stride-2 convolutions as TFLite pads.
    """
    form = export_form_model(model, input_size, chunk, widen)
    choose_schedules(form, input_size)
    return form
