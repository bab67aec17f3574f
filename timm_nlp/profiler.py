"""Model cost accounting: multiply-accumulates (attention included) and layer-by-layer activation memory."""
import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    'count_macs', 'activation_profile', 'ActivationProfile', 'LayerMemory', 'ModelProfile', 'profile_model',
    'compare_table', 'plot_memory', 'ACCOUNTINGS', 'patched_profile', 'lowest_patched_profile', 'patched_macs',
    'measured_peak_bytes',
]


def _deform_conv2d_flops(x_shape, weight_shape, offset_shape, mask_shape, bias_shape, *args, out_shape=None, **kw):
    """FLOPs of torchvision's deform_conv2d: those of the convolution it computes (bilinear sampling excluded)."""
    batch, out_ch, out_h, out_w = out_shape
    _, in_per_group, kh, kw_ = weight_shape
    return 2 * batch * out_ch * out_h * out_w * in_per_group * kh * kw_


def meta_copy(module: nn.Module, drop_hooks: bool = False) -> nn.Module:
    """A copy of ``module`` on the meta device, its parameters and buffers never copied (each becomes an empty meta
    tensor; those of a ``_model`` it refers to without owning too), in eval mode; ``drop_hooks`` leaves out the
    forward hooks registered on it."""
    owners = [module] + ([module.__dict__['_model']] if '_model' in module.__dict__ else [])
    memo = {}
    for owner in owners:
        for t in list(owner.parameters()) + list(owner.buffers()):
            if id(t) not in memo:
                meta_t = torch.empty_like(t, device='meta')
                memo[id(t)] = nn.Parameter(meta_t, t.requires_grad) if isinstance(t, nn.Parameter) else meta_t
    meta = copy.deepcopy(module, memo).eval()
    if drop_hooks:
        for m in meta.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
    return meta


def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass: convolutions, linear layers and matmuls, attention included.

    Runs on a meta-device copy in eval mode (no memory, any size) under the math SDPA backend, because torch's
    FlopCounterMode does not see inside the fused CPU attention kernel; deformable convolutions count as
    convolutions. Element-wise operations, normalisation and pooling are not counted.
    """
    import torchvision.ops  # noqa: F401  registers torch.ops.torchvision
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


def _held_bytes(held: List[Tuple[torch.Tensor, ...]], inputs, output, itemsize: int) -> int:
    """Bytes of the held tensors, each storage once, less those the step takes or gives (counted as such)."""
    seen = {t.untyped_storage()._cdata for t in _tensors((inputs, output))}  # meta tensors have no data_ptr
    total = 0
    for t in _tensors(held):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += _nbytes(t, itemsize)
    return total


def _operand_bytes(module: nn.Module, inputs, output: torch.Tensor, itemsize: int) -> int:
    """The map a compound step computes with besides its input: a weighted pooling's importance map (input-sized,
    or, where it is constant in every window, the token weights and their output-sized up-sampling; none for a
    window-normalised such pool in eval, an average pool), a deformable conv's offsets and mask; else 0."""
    from timm_nlp.layers import DeformConv2d, WeightedPool2d
    if isinstance(module, DeformConv2d):
        B, _, H, W = output.shape
        k = module.kernel_size
        return B * 3 * k * k * H * W * itemsize
    if not isinstance(module, WeightedPool2d):
        return 0
    x = inputs[0]
    if not module.window_constant(x):
        return _nbytes(x, itemsize)
    if module.win_norm:
        return 0
    B, C, H, W = x.shape
    p = module.nlp.patch_size
    return (B * C * (H // p) * (W // p) + output.numel()) * itemsize


ACCOUNTINGS = ('layers', 'mcunet', 'inplace-dw')
DTYPES = {'float32': 4, 'float16': 2, 'bfloat16': 2, 'int8': 1}


def _itemsize(dtype: Union[torch.dtype, str]) -> int:
    name = dtype if isinstance(dtype, str) else str(dtype).replace('torch.', '')
    if name not in DTYPES:
        raise ValueError(f"activation memory is counted for {', '.join(DTYPES)}, not '{name}'.")
    return DTYPES[name]


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels == \
        module.out_channels


def _residual_blocks(model: nn.Module) -> Dict[nn.Module, Tuple[List[nn.Module], bool]]:
    """timm's residual blocks: their main-path convs in order, and whether their shortcut is a projection."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.resnet import BasicBlock, Bottleneck
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

    In every accounting, a compound layer is one step too, after its internal steps: a pooling layer
    (WeightedPool2d, GaussianPool2d), whose live memory adds the importance map it weights with (input-sized, or
    the token weights and their up-sampling to the windows where they are constant per window), and a conv with an
    internal branch, counted like nn.Conv2d: DynamicConv2d (its K routing weights are negligible; its per-sample
    mixed kernel is weight-sized and not counted) and DeformConv2d (plus the offset and mask maps it samples with).
    While a compound layer's internal steps run (its importance, routing or offset branch), its input stays live,
    and so do the maps it computed before them (mixp's non-local map during the local branch; the pooled map of a
    pool whose weights are constant per window): a step counts these as held unless it takes or gives them (same
    storage), so a held tensor is never counted twice. ``dtype`` may be ``int8`` (one byte per element): the
    shapes are those of the float model.
    """
    from timm_nlp.layers import (
        DeformConv2d, DynamicConv2d, GaussianPool2d, WeightedPool2d, WindowAvgPool2d, WindowMaxPool2d)
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting '{accounting}' is not one of {', '.join(ACCOUNTINGS)}.")
    itemsize = _itemsize(dtype)
    meta = meta_copy(model).to(dtype=torch.float32)
    compound_types = (WeightedPool2d, GaussianPool2d, DynamicConv2d, DeformConv2d)
    folded = accounting != 'layers'
    step_types = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                  WindowAvgPool2d, WindowMaxPool2d)
    layers: List[LayerMemory] = []
    modules: List[nn.Module] = []
    held: List[Tuple[torch.Tensor, ...]] = []
    depths: List[int] = []
    hooks = []

    def step_hook(name: str, compound: bool = False):
        def hook(module, inputs, output):
            if compound:
                del held[depths.pop():]
            if isinstance(module, DeformConv2d):
                output = output[0]  # (embedding, offsets): the offsets are its operand
            layers.append(LayerMemory(
                name, type(module).__name__, tuple(output.shape), _nbytes(inputs, itemsize), _nbytes(output, itemsize),
                _operand_bytes(module, inputs, output, itemsize), _held_bytes(held, inputs, output, itemsize),
                inplace=accounting == 'inplace-dw' and _is_depthwise(module)))
            modules.append(module)
        return hook

    def enter(module, inputs):
        depths.append(len(held))
        held.append(inputs)
        if isinstance(module, WeightedPool2d) and module.window_constant(inputs[0]) and not module.win_norm:
            B, C, H, W = inputs[0].shape
            s = module.stride
            held.append((inputs[0].new_empty(B, C, H // s, W // s),))  # the pooled map, computed first

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
        if isinstance(module, compound_types):
            hooks.append(module.register_forward_pre_hook(enter))
            hooks.append(module.register_forward_hook(step_hook(name, compound=True)))
            if isinstance(module, WeightedPool2d) and module.local is not None and module.nlp is not None:
                # mixp: the non-local map, computed first, is kept while the local branch runs
                hooks.append(module.nlp.register_forward_hook(lambda m, inputs, output: held.append((output,))))
        elif not any(True for _ in module.children()) and name and (not folded or isinstance(module, step_types)):
            hooks.append(module.register_forward_hook(step_hook(name)))
    if folded:
        for block, (convs, projection) in _residual_blocks(meta).items():
            hooks += block_hooks(block, convs, projection)
    with torch.no_grad():
        meta(torch.empty(batch_size, *input_size, device='meta'))
    for h in hooks:
        h.remove()
    return ActivationProfile(layers, accounting)


def patched_profile(
        model: nn.Module,
        input_size: Tuple[int, int, int] = (3, 224, 224),
        patches: int = 4,
        split: Optional[str] = None,
        dtype: Union[torch.dtype, str] = torch.float32,
        accounting: str = 'mcunet',
) -> ActivationProfile:
    """Activation memory of patch-based execution (``timm_nlp.patch_based``), counted as ``activation_profile``
    counts a step.

    The prefix's steps run on the largest patch (its input crop, rows and columns each the largest of the plan),
    each also holding the prefix's output map being assembled, then the rest of the network runs on the assembled
    map. A non-local pool of the prefix adds a first pass (the steps before it on the largest patch, holding the
    token grid being assembled), then its attention on the whole token grid; every later step holds its token
    weights, and its pooling step counts no attention of its own. A Gaussian pool's first pass holds its
    per-channel sums, its global branch (on 1 x 1 maps) is not counted. The input image is read patch by patch (only the
    crop is counted, as MCUNetV2 counts it)."""
    from .patching import PatchBased, _shape_only, _Units
    wrapped = PatchBased(model, patches, split)
    plan = wrapped.plan(input_size)
    h, w = plan.max_patch
    itemsize = _itemsize(dtype)
    with _shape_only(wrapped.prefix):
        first = activation_profile(wrapped.prefix, (input_size[0], h, w), dtype=dtype, accounting=accounting)
        with torch.no_grad():
            out = _meta_prefix_output(wrapped.prefix, input_size)
    steps, weights = [], 0
    pool_names = [nl.name for nl in plan.non_local]
    for nl in plan.non_local:
        pool = wrapped.prefix.get_submodule(nl.name)
        grid = (nl.in_size[0] // nl.patch_size, nl.in_size[1] // nl.patch_size)
        # what the first pass assembles: the token grid, or a Gaussian pool's per-channel sums
        tokens = (pool.nlp.embed_dim * grid[0] * grid[1] if nl.kind == 'nlp' else pool.channels) * itemsize
        before = first.layers[:next((i for i, layer in enumerate(first.layers) if layer.name.startswith(nl.name)),
                                    len(first.layers))]
        steps += [dataclasses.replace(layer, name=f'{nl.kind}-pass:{layer.name}',
                                      held_bytes=layer.held_bytes + tokens + weights) for layer in before]
        if nl.kind == 'nlp':
            attention = activation_profile(_TokenWeights(pool.nlp, nl.in_size), (pool.nlp.embed_dim, *grid),
                                           dtype=dtype, accounting=accounting)
            steps += [dataclasses.replace(layer, name=f'attention:{nl.name}.{layer.name}',
                                          held_bytes=layer.held_bytes + weights) for layer in attention.layers]
        weights += pool.channels * (grid[0] * grid[1] if nl.kind == 'nlp' else 1) * itemsize
    assembled = out.numel() * itemsize
    steps += [dataclasses.replace(layer, name=f'patch:{layer.name}', held_bytes=layer.held_bytes + assembled + weights)
              for layer in first.layers if not any(layer.name.startswith(f'{n}.') for n in pool_names)]
    rest = activation_profile(_Units(model, wrapped.rest.units, head=True), tuple(out.shape[1:]), dtype=dtype,
                              accounting=accounting)
    return ActivationProfile(steps + rest.layers, accounting)


def lowest_patched_profile(
        model: nn.Module,
        input_size: Tuple[int, int, int] = (3, 224, 224),
        patches: int = 4,
        dtype: Union[torch.dtype, str] = torch.float32,
        accounting: str = 'mcunet',
) -> Tuple[str, ActivationProfile]:
    """The split with the lowest patch-based peak among the units the prefix can reach (the first of equal ones),
    and its ``patched_profile``; a ValueError if not even the first unit can be run patch by patch."""
    from .patching import model_units
    best = None
    for unit in model_units(model):
        try:
            profile = patched_profile(model, input_size, patches, unit, dtype=dtype, accounting=accounting)
        except ValueError:  # this unit needs the whole map (or has too few rows), and so do all later ones
            break
        if best is None or profile.peak_bytes < best[1].peak_bytes:
            best = (unit, profile)
    if best is None:
        raise ValueError(f'no prefix of {type(model).__name__} can be run patch by patch: its first unit needs the '
                         'whole map.')
    return best


def patched_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224), patches: int = 4,
                 split: Optional[str] = None) -> int:
    """Multiply-accumulates of patch-based execution: every patch's prefix on its crop (the halos recomputed), the
    first passes of two-pass pools, and the rest of the network (``count_macs`` of the ``patch_based`` module)."""
    from .patching import PatchBased
    wrapped = PatchBased(model, patches, split)
    wrapped.plan(input_size)  # the plan's own meta runs are not part of the execution
    return count_macs(wrapped, input_size)


class _TokenWeights(nn.Module):
    """A non-local importance's attention on a token grid: the second step of its two-pass patch-based execution."""

    def __init__(self, nlp: nn.Module, size: Tuple[int, int]):
        super().__init__()
        self.nlp, self.size = nlp, size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.nlp.weights_of_tokens(t, self.size)


def _meta_prefix_output(prefix: nn.Module, input_size: Tuple[int, int, int]) -> torch.Tensor:
    meta = meta_copy(prefix)
    return meta(torch.empty(1, *input_size, device='meta'))


def measured_peak_bytes(fn: Callable[[], object]) -> int:
    """The peak of the bytes ``fn`` holds allocated on the CPU while it runs, from torch.profiler's memory events
    (every allocation and free of the CPU allocator, in order; the measurement of real execution that the counts
    are checked against). What existed before the call is not counted; what it returns is."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@dataclass
class ModelProfile:
    """Costs of one model at one input size."""
    name: str
    base: str
    params: int
    macs: int
    memory: ActivationProfile
    stage_prefixes: Tuple[str, ...] = ()
    split: Optional[str] = None
    patched_macs: Optional[int] = None

    @property
    def stage_peak_bytes(self) -> int:
        """Peak over the steps of the stages, i.e. beyond the stem."""
        return max(layer.live_bytes for layer in self.memory.layers if layer.name.startswith(self.stage_prefixes))


def profile_model(name: str, img_size: int = 224, dtype: Union[torch.dtype, str] = torch.float32,
                  accounting: str = 'layers', patches: Optional[int] = None, split: Optional[str] = None
                  ) -> ModelProfile:
    """Params, MACs and activation memory of a model (any timm name or architecture string), built on the meta
    device; with ``patches``, of patch-based execution (``patched_profile``; ``split`` by default the lowest peak)."""
    from timm_nlp.models import create_model
    model = create_model(name, device='meta')
    arch = getattr(model, 'arch', None)
    size = (3, img_size, img_size)
    stems = ('act1', 'stem', 'bn1', 'conv1', 'conv_stem')
    stages = tuple(sorted({f['module'].split('.')[0] + '.' if f['module'].startswith(('stages.', 'blocks.'))
                           else f['module'] for f in model.feature_info if not f['module'].startswith(stems)}))
    if patches and split is None:  # the split with the lowest mcunet peak, whatever the accounting counted
        split, memory = lowest_patched_profile(model, size, patches, dtype=dtype)
        if accounting != 'mcunet':
            memory = patched_profile(model, size, patches, split, dtype=dtype, accounting=accounting)
    elif patches:
        memory = patched_profile(model, size, patches, split, dtype=dtype, accounting=accounting)
    else:
        memory = activation_profile(model, size, dtype=dtype, accounting=accounting)
    return ModelProfile(name, arch.base_name if arch is not None else name,
                        sum(p.numel() for p in model.parameters()), count_macs(model, size), memory, stages,
                        split if patches else None, patched_macs(model, size, patches, split) if patches else None)


def compare_table(profiles: List[ModelProfile], bases: dict) -> List[List[str]]:
    """Rows of the ``--compare`` table; ``bases`` maps a base name to its own profile."""
    rows = []
    for p in profiles:
        b = bases[p.base]
        rows.append([p.name, f'{p.params / 1e6:.2f}', f'{p.macs / 1e9:.3f}', f'{p.macs / b.macs:.2f}x',
                     f'{p.memory.peak_bytes / 1024:.0f}', f'{b.memory.peak_bytes / p.memory.peak_bytes:.2f}x',
                     f'{p.stage_peak_bytes / 1024:.0f}', f'{b.stage_peak_bytes / p.stage_peak_bytes:.2f}x',
                     f'{p.memory.largest_map_bytes / 1024:.0f}', p.memory.peak_layer.name])
    return rows


def plot_memory(profiles: List[ModelProfile], path: str) -> None:
    """Per-step live activation memory of each model (matplotlib, the ``plot`` extra)."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('--plot needs matplotlib: pip install "timm-nlp[plot]"') from e
    fig, ax = plt.subplots(figsize=(10, 5))
    for p in profiles:
        ax.plot([layer.live_bytes / 1024 for layer in p.memory.layers], label=p.name, linewidth=1.2)
    ax.set_yscale('log')
    ax.set_xlabel('step (layer-by-layer execution order)')
    ax.set_ylabel('live activation memory (KiB, log)')
    ax.legend(fontsize=8)
    ax.grid(True, which='both', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
