"""Model cost accounting: multiply-accumulates (attention included) and layer-by-layer activation memory."""
import copy
from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    'count_macs', 'activation_profile', 'ActivationProfile', 'LayerMemory', 'ModelProfile', 'profile_model',
    'compare_table', 'plot_memory',
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
    import torchvision.ops  # noqa: F401  registers torch.ops.torchvision
    meta = copy.deepcopy(model).to('meta').eval()
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

    @property
    def live_bytes(self) -> int:
        return self.in_bytes + self.out_bytes + self.operand_bytes + self.held_bytes


@dataclass
class ActivationProfile:
    """Activation memory of one forward pass under layer-by-layer execution."""
    layers: List[LayerMemory]

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


def _nbytes(x) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


def _held_bytes(held: List[Tuple[torch.Tensor, ...]], inputs, output) -> int:
    """Bytes of the held tensors, each storage once, less those the step takes or gives (counted as such)."""
    seen = {t.untyped_storage()._cdata for t in _tensors((inputs, output))}  # meta tensors have no data_ptr
    total = 0
    for t in _tensors(held):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += _nbytes(t)
    return total


def _operand_bytes(module: nn.Module, inputs, output: torch.Tensor) -> int:
    """The map a compound step computes with besides its input: a weighted pooling's importance map (input-sized,
    or, where it is constant in every window, the token weights and their output-sized up-sampling; none for a
    window-normalised such pool in eval, an average pool), a deformable conv's offsets and mask; else 0."""
    from timm_nlp.layers import DeformConv2d, WeightedPool2d
    if isinstance(module, DeformConv2d):
        B, _, H, W = output.shape
        k = module.kernel_size
        return B * 3 * k * k * H * W * output.element_size()
    if not isinstance(module, WeightedPool2d):
        return 0
    x = inputs[0]
    if not module.window_constant(x):
        return _nbytes(x)
    if module.win_norm:
        return 0
    B, C, H, W = x.shape
    p = module.nlp.patch_size
    return B * C * (H // p) * (W // p) * output.element_size() + _nbytes(output)


def activation_profile(
        model: nn.Module,
        input_size: Tuple[int, int, int] = (3, 224, 224),
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
) -> ActivationProfile:
    """Per-step activation memory of an inference forward pass (meta device, nothing allocated).

    A step is a leaf module (a conv, a norm, an activation, a linear layer...). Its live memory is its input
    plus its output activation, the way microcontroller inference engines count layer-by-layer execution.
    A compound layer is one step too, after its internal steps: a pooling layer (WeightedPool2d, GaussianPool2d),
    whose live memory adds the importance map it weights with (input-sized, or the token weights and their
    up-sampling to the windows where they are constant per window), and a conv with an internal branch, counted like nn.Conv2d: DynamicConv2d (its K
    routing weights are negligible; its per-sample mixed kernel is weight-sized and not counted) and DeformConv2d
    (plus the offset and mask maps it samples with). While a compound layer's internal steps run (its importance,
    routing or offset branch), its input stays live, and so do the maps it computed before them (mixp's non-local
    map during the local branch; the pooled map of a pool whose weights are constant per window): a step counts these
    as held unless it takes or gives them (same storage), so a held tensor is never counted twice (an in-place
    activation or an identity still counts its input and output apart). Tensors held across other steps
    (residual shortcuts) are not counted: a step's live memory is its own input and output.
    """
    from timm_nlp.layers import DeformConv2d, DynamicConv2d, GaussianPool2d, WeightedPool2d
    meta = copy.deepcopy(model).to(device='meta', dtype=dtype).eval()
    layers: List[LayerMemory] = []
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
                name, type(module).__name__, tuple(output.shape), _nbytes(inputs), _nbytes(output),
                _operand_bytes(module, inputs, output), _held_bytes(held, inputs, output)))
        return hook

    def enter(module, inputs):
        depths.append(len(held))
        held.append(inputs)
        if isinstance(module, WeightedPool2d) and module.window_constant(inputs[0]) and not module.win_norm:
            B, C, H, W = inputs[0].shape
            s = module.stride
            held.append((inputs[0].new_empty(B, C, H // s, W // s),))  # the pooled map, computed first

    for name, module in meta.named_modules():
        if isinstance(module, (WeightedPool2d, GaussianPool2d, DynamicConv2d, DeformConv2d)):
            hooks.append(module.register_forward_pre_hook(enter))
            hooks.append(module.register_forward_hook(step_hook(name, compound=True)))
            if isinstance(module, WeightedPool2d) and module.local is not None and module.nlp is not None:
                # mixp: the non-local map, computed first, is kept while the local branch runs
                hooks.append(module.nlp.register_forward_hook(lambda m, inputs, output: held.append((output,))))
        elif not any(True for _ in module.children()) and name:
            hooks.append(module.register_forward_hook(step_hook(name)))
    with torch.no_grad():
        meta(torch.empty(batch_size, *input_size, device='meta', dtype=dtype))
    for h in hooks:
        h.remove()
    return ActivationProfile(layers)


@dataclass
class ModelProfile:
    """Costs of one model at one input size."""
    name: str
    base: str
    params: int
    macs: int
    memory: ActivationProfile
    stage_prefixes: Tuple[str, ...] = ()

    @property
    def stage_peak_bytes(self) -> int:
        """Peak over the steps of the stages, i.e. beyond the stem."""
        return max(layer.live_bytes for layer in self.memory.layers if layer.name.startswith(self.stage_prefixes))


def profile_model(name: str, img_size: int = 224, dtype: torch.dtype = torch.float32) -> ModelProfile:
    """Params, MACs and layer-by-layer activation memory of a model (any timm name or architecture string),
    built on the meta device."""
    from timm_nlp.models import create_model
    model = create_model(name, device='meta')
    arch = getattr(model, 'arch', None)
    size = (3, img_size, img_size)
    stems = ('act1', 'stem', 'bn1', 'conv1', 'conv_stem')
    stages = tuple(sorted({f['module'].split('.')[0] + '.' if f['module'].startswith(('stages.', 'blocks.'))
                           else f['module'] for f in model.feature_info if not f['module'].startswith(stems)}))
    return ModelProfile(name, arch.base_name if arch is not None else name,
                        sum(p.numel() for p in model.parameters()), count_macs(model, size),
                        activation_profile(model, size, dtype=dtype), stages)


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
