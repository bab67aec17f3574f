"""Patch-based execution (MCUNetV2, Lin et al., NeurIPS 2021): the high-resolution prefix of a network run on an
n x n grid of overlapping input patches, each with the halo its receptive field needs, the prefix's output assembled,
the rest of the network run on it as usual. Only one patch's activations and the assembled output are live in the
prefix, which is where layer-by-layer execution peaks.

The layers say how they run patch by patch (``timm_nlp.layers.protocol``): local, refused, or in two passes (a
non-local pool's tokens embedded patch by patch and its attention run once on the token grid; a Gaussian pool's mean
summed patch by patch). Their costs, counted as the profiler counts a step, are ``patched_profile`` and
``patched_macs``.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ._modules import Units, has_submodule, meta_copy, model_units, substituted
from .layers.export_ops import tree_cat
from .layers.protocol import CompoundLayer, PoolLayer, ShapeOnly
from .export_model import DEFAULT_CHUNK, export_form_model
from .profiler import (ActivationProfile, activation_profile, choose_schedules, count_macs, itemsize_of,
                       tflm_profile)

__all__ = [
    'patch_based', 'PatchBased', 'PatchPlan', 'TwoPass', 'patch_plan', 'model_units', 'patched_profile',
    'lowest_patched_profile', 'patched_macs',
]

# modules of timm and torch that pool the whole map (the layers of timm-nlp say so themselves)
_WHOLE_MAP_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_WHOLE_MAP_NAMES = ('SqueezeExcite', 'SEModule', 'EffectiveSEModule', 'SelectAdaptivePool2d')


def _check_patchable(prefix: nn.Module) -> None:
    """Raise if a layer of the prefix needs more than a bounded neighbourhood of its input or two passes."""
    for name, m in prefix.named_modules():
        why = None
        if isinstance(m, CompoundLayer):
            support = m.patch_support()
            why = support.reason if support.mode == 'whole-map' else None
        elif isinstance(m, _WHOLE_MAP_TYPES) or type(m).__name__ in _WHOLE_MAP_NAMES:
            why = 'it pools the whole map'
        if why:
            raise ValueError(f"the prefix cannot be run patch by patch exactly: '{name}' ({type(m).__name__}) needs "
                             f'the whole map: {why}. Choose an earlier split.')


def _two_pass_pools(module: nn.Module) -> Dict[str, PoolLayer]:
    return {n: m for n, m in module.named_modules()
            if isinstance(m, PoolLayer) and m.patch_support().mode == 'two-pass'}


@dataclass
class TwoPass:
    """A pool of the prefix run in two passes: its name, label and token size, its input's stride in image pixels,
    its input size, and how far the zero padding of the layers before it reaches (image pixels)."""
    name: str
    label: str
    token_size: int
    stride_in: int
    in_size: Tuple[int, int]
    halo_before: int


def _spatial_ops(prefix: nn.Module, input_size: Tuple[int, int, int]) -> Tuple[List[int], List[TwoPass]]:
    """Of every padded op of the meta ``prefix`` in execution order (a meta forward, its two-pass pools shape-only): how
    far, in image pixels, the zero padding at an inner edge of a crop reaches into its output (its padding on one
    side, its extent less the padding on the other, times its input's stride); and the prefix's two-pass pools."""
    pools = _two_pass_pools(prefix)
    view = substituted(prefix, {n: ShapeOnly(p) for n, p in pools.items()})
    reach: List[int] = []
    found: List[TwoPass] = []
    H = input_size[1]

    def record(m, inputs, output):
        stride_in = H // inputs[0].shape[-2]
        if isinstance(m, nn.Conv2d):
            k, d, p = m.kernel_size[0], m.dilation[0], m.padding
            extent = (k - 1) * d
            p = extent // 2 if p == 'same' else 0 if p == 'valid' else p[0]
        else:
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            p = m.padding if isinstance(m.padding, int) else m.padding[0]
            extent = 0 if k == s and not p else k - 1  # unpadded windows tiling the (aligned) crop reach nothing
        reach.append(max(p, extent - p) * stride_in)

    def pool_hook(name: str):
        def hook(m, inputs):  # a pool's windows of its stride have no padding: no halo of its own
            support = pools[name].patch_support()
            found.append(TwoPass(name, support.label, support.token_size, H // inputs[0].shape[-2],
                                 tuple(inputs[0].shape[-2:]), sum(reach)))
        return hook
    hooks = []
    for name, m in view.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            hooks.append(m.register_forward_hook(record))
        elif isinstance(m, ShapeOnly):
            hooks.append(m.register_forward_pre_hook(pool_hook(name)))
    try:
        with torch.no_grad():
            view(torch.empty(1, *input_size, device='meta'))
    finally:
        for h in hooks:
            h.remove()
    return reach, found


@dataclass
class PatchPlan:
    """Where the patches of a prefix lie: the output ranges of each row and column of patches and the input crops
    that compute them (rows and columns alike, as (start, end) pairs), the prefix's stride and halo, and its two-pass
    pools."""
    split: str
    stride: int
    halo: int
    out_size: Tuple[int, int]
    out_rows: List[Tuple[int, int]]
    out_cols: List[Tuple[int, int]]
    in_rows: List[Tuple[int, int]]
    in_cols: List[Tuple[int, int]]
    in_size: Tuple[int, int] = (0, 0)
    two_pass: Tuple[TwoPass, ...] = ()

    @property
    def max_patch(self) -> Tuple[int, int]:
        """The largest input crop, rows by columns."""
        return max(b - a for a, b in self.in_rows), max(b - a for a, b in self.in_cols)

    def patches(self) -> Iterator[Tuple[Tuple[int, int, int, int], Tuple[int, int, int, int]]]:
        """Every patch, row by row: its output ranges (rows, columns) and its input crop."""
        for (o0, o1), (a0, a1) in zip(self.out_rows, self.in_rows):
            for (p0, p1), (b0, b1) in zip(self.out_cols, self.in_cols):
                yield (o0, o1, p0, p1), (a0, a1, b0, b1)


def _ranges(n_out: int, patches: int, stride: int, halo: int, n_in: int, align: int
            ) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    if patches > n_out:
        raise ValueError(f'{patches} patches a side need at least {patches} output rows and columns; the prefix '
                         f'gives {n_out}.')
    bounds = [round(i * n_out / patches) for i in range(patches + 1)]
    outs = list(zip(bounds[:-1], bounds[1:]))
    ins = [(max(0, (o0 * stride - halo) // align * align), min(n_in, -(-(o1 * stride + halo) // align) * align))
           for o0, o1 in outs]
    return outs, ins


def _check_patches(patches: int) -> None:
    if patches < 1:
        raise ValueError(f'patches must be at least 1, not {patches}.')


def _prefix(model: nn.Module, split: str) -> Units:
    units = model_units(model)
    if split not in units:
        raise ValueError(f"split '{split}' is not one of the model's units: {', '.join(units)}.")
    return Units(model, units[:units.index(split) + 1])


def patch_plan(model: nn.Module, input_size: Tuple[int, int, int], patches: int, split: str) -> PatchPlan:
    """The patches of ``model``'s prefix up to and including the unit ``split`` for one input size."""
    prefix = _prefix(model, split)
    _check_patchable(prefix)
    meta = meta_copy(prefix, drop_hooks=True)  # the plan's meta runs are not forwards: no user hooks
    shapes = substituted(meta, {n: ShapeOnly(p) for n, p in _two_pass_pools(meta).items()})
    C, H, W = input_size

    def out_hw(h, w):
        with torch.no_grad():
            return shapes(torch.empty(1, C, h, w, device='meta')).shape[-2:]
    big = 64 * max(H, W)
    h1, h2 = out_hw(big, big)[0], out_hw(2 * big, 2 * big)[0]
    stride = round(big / (h2 - h1))
    reach, pools = _spatial_ops(meta, (C, big, big))
    sized = {p.name: p for p in _spatial_ops(meta, input_size)[1]}
    # crops start (and, inside the map, end) on a grid of the prefix's stride and of every two-pass pool's tokens
    align = math.lcm(stride, *[p.token_size * p.stride_in for p in pools])
    halo = max([sum(reach)] + [p.halo_before + p.token_size * p.stride_in for p in pools])
    halo = -(-halo // align) * align
    Ho, Wo = out_hw(H, W)
    two_pass = []
    for p in pools:  # at this input size, the token grid must tile the map
        hp, wp = sized[p.name].in_size
        q = p.token_size
        if hp % q or wp % q:
            raise ValueError(f"the prefix cannot be run patch by patch exactly: the {q} x {q} tokens of '{p.name}' "
                             f'do not tile its {hp} x {wp} input. Choose an input size or split that they tile.')
        two_pass.append(dataclasses.replace(p, in_size=(hp, wp)))
    out_rows, in_rows = _ranges(Ho, patches, stride, halo, H, align)
    out_cols, in_cols = _ranges(Wo, patches, stride, halo, W, align)
    return PatchPlan(split, stride, halo, (Ho, Wo), out_rows, out_cols, in_rows, in_cols, (H, W), tuple(two_pass))


class _PatchPool(nn.Module):
    """A two-pass pool on the current patch: ``pool.pool_patch`` with the global state and the crop's origin (image
    pixels), both set by ``PatchBased`` before each run."""

    def __init__(self, pool: PoolLayer, stride_in: int):
        super().__init__()
        self.__dict__['pool'] = pool  # not a child: it runs through pool_patch, not as a module
        self.stride_in = stride_in
        self.state: Optional[torch.Tensor] = None
        self.origin = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool.pool_patch(x, self.state, (self.origin[0] // self.stride_in, self.origin[1] // self.stride_in))


class _Capture(nn.Module):
    """An identity that keeps what it passed on (the input of a pool that its container computes last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x


@dataclass
class _Views:
    """The module views of one prefix's passes: the two-pass pools' stand-ins (in the prefix's order), for each the
    view computing its input (with a capture where a container holds it), and the prefix of the second pass."""
    stand_ins: Dict[str, _PatchPool]
    first: List[Tuple[nn.Module, Optional[_Capture]]]
    prefix: nn.Module


def _until(prefix: Units, name: str) -> Tuple[Units, Optional[str]]:
    """The part of ``prefix`` that computes the input of its module ``name``: the units before it, expanded through
    ``nn.Sequential`` containers down to the module itself; where a container of another kind holds it, that container
    too (then the module's path in the result, for an identity stand-in: it must be that container's last step)."""
    model = prefix._model
    steps: List[str] = []
    for unit in prefix.units:
        if name != unit and not name.startswith(unit + '.'):
            steps.append(unit)
            continue
        path = unit
        while path != name:
            container = model.get_submodule(path)
            if not isinstance(container, nn.Sequential):
                return Units(model, steps + [path]), name
            child = name[len(path) + 1:].split('.')[0]
            for sub in container._modules:
                if sub == child:
                    break
                steps.append(f'{path}.{sub}')
            path = f'{path}.{child}'
        return Units(model, steps), None
    raise KeyError(name)


class PatchBased(nn.Module):
    """``model`` with its prefix (up to and including the unit ``split``) run patch by patch.

    The prefix is run on ``patches`` x ``patches`` overlapping input crops whose output ranges tile its output map;
    each crop reaches a halo beyond its part (the sum of how far each padded layer's zero padding reaches, in input
    pixels, rounded up to the prefix's stride; crops start on the stride's grid) so the zero padding at a crop's
    inner edges reaches only outputs that are discarded. Modules are shared with ``model`` (no copy); inference only.
    """

    def __init__(self, model: nn.Module, patches: int, split: str):
        super().__init__()
        self.train(model.training)
        _check_patches(patches)
        self.model = model
        self.patches = patches
        self.split = split
        self.prefix = _prefix(model, split)
        units = model_units(model)
        self.rest = Units(model, units[units.index(split) + 1:])
        _check_patchable(self.prefix)
        self._plans: Dict[Tuple[int, int, int], PatchPlan] = {}
        self._pass_views: Dict[tuple, _Views] = {}

    def plan(self, input_size: Tuple[int, int, int]) -> PatchPlan:
        """The patches for one input size (computed once per size)."""
        if input_size not in self._plans:
            self._plans[input_size] = patch_plan(self.model, input_size, self.patches, self.split)
            self._views(self._plans[input_size])
        return self._plans[input_size]

    def _views(self, plan: PatchPlan) -> _Views:
        """The module views of ``plan``'s passes (built once: tracing for export may not build modules)."""
        key = tuple((tp.name, tp.stride_in) for tp in plan.two_pass)
        if key not in self._pass_views:
            stand_ins: Dict[str, _PatchPool] = {}
            first = []
            for tp in plan.two_pass:
                until, path = _until(self.prefix, tp.name)
                capture = _Capture() if path is not None else None
                replace: Dict[str, nn.Module] = {n: m for n, m in stand_ins.items() if has_submodule(until, n)}
                if path is not None:
                    replace[path] = capture
                first.append((substituted(until, replace), capture))
                stand_ins[tp.name] = _PatchPool(self.prefix.get_submodule(tp.name), tp.stride_in)
            self._pass_views[key] = _Views(stand_ins, first, substituted(self.prefix, dict(stand_ins)))
        return self._pass_views[key]

    def _first_pass(self, x: torch.Tensor, plan: PatchPlan, tp: TwoPass, run: nn.Module, capture: Optional[_Capture],
                    stand_ins: List[_PatchPool]) -> torch.Tensor:
        """The global state of the two-pass pool ``tp``: its first pass on every patch's own region of its input (the
        patch's output ranges scaled to the pool's input, the last row and column to the map's end, their bounds
        rounded down to whole tokens: the regions tile the token grid, and the halo covers the rounding), the earlier
        two-pass pools applying their states."""
        pool: PoolLayer = self.prefix.get_submodule(tp.name)
        q, si, s = tp.token_size, tp.stride_in, plan.stride // tp.stride_in
        Hp, Wp = tp.in_size
        last_row, last_col = plan.out_rows[-1][1], plan.out_cols[-1][1]
        parts = []
        for (o0, o1, p0, p1), (a0, a1, b0, b1) in plan.patches():
            for m in stand_ins:
                m.origin = (a0, b0)
            # the crop sliced columns first: a graph compiler that merges common subexpressions (TFLite's) would
            # otherwise keep every patch's first-pass maps alive for the second pass instead of recomputing them
            out = run(x[:, :, :, b0:b1][:, :, a0:a1])
            if capture is not None:
                if capture.seen is not out:
                    raise ValueError(f"'{tp.name}' is not the last step of the module that holds it: it cannot be run "
                                     'in two passes.')
                capture.seen = None
            r0, r1 = o0 * s // q * q, Hp if o1 == last_row else o1 * s // q * q
            c0, c1 = p0 * s // q * q, Wp if p1 == last_col else p1 * s // q * q
            if r0 == r1 or c0 == c1:  # a patch that owns less than a token: its neighbours embed it
                continue
            region = out[:, :, r0 - a0 // si:r1 - a0 // si, c0 - b0 // si:c1 - b0 // si]
            parts.append(((r0, c0), pool.first_pass(region)))
        return pool.global_state(parts, tp.in_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            raise RuntimeError('patch-based execution is for inference: call .eval() first (batch norms in training '
                               'mode use the statistics of each patch).')
        plan = self.plan(tuple(x.shape[1:]))
        views = self._views(plan)
        stand_ins = list(views.stand_ins.values())
        for i, (tp, (run, capture)) in enumerate(zip(plan.two_pass, views.first)):
            stand_ins[i].state = self._first_pass(x, plan, tp, run, capture, stand_ins[:i])
        s = plan.stride
        rows: Dict[int, List[torch.Tensor]] = {}
        for (o0, o1, p0, p1), (a0, a1, b0, b1) in plan.patches():
            for m in stand_ins:
                m.origin = (a0, b0)
            y = views.prefix(x[:, :, a0:a1, b0:b1])
            rows.setdefault(o0, []).append(y[:, :, o0 - a0 // s:o1 - a0 // s, p0 - b0 // s:p1 - b0 // s])
        for m in stand_ins:
            m.state = None
        # assembled by concatenation, at most ten pieces at a time (as TFLite Micro's CONCATENATION takes them)
        return self.rest(tree_cat([tree_cat(row, -1) for _, row in sorted(rows.items())], -2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.forward_features(x))


def patched_profile(
        model: nn.Module,
        input_size: Tuple[int, int, int] = (3, 224, 224),
        patches: int = 4,
        split: Optional[str] = None,
        dtype: Union[torch.dtype, str] = torch.float32,
        accounting: str = 'mcunet',
) -> ActivationProfile:
    """Activation memory of patch-based execution (``patch_based``), counted as ``activation_profile`` counts a step.

    The prefix's steps run on the largest patch (its input crop, rows and columns each the largest of the plan),
    each also holding the prefix's output map being assembled, then the rest of the network runs on the assembled
    map. A two-pass pool of the prefix adds a first pass (the steps before it on the largest patch, holding what it
    assembles: a non-local pool's token grid, a Gaussian pool's per-channel sums), then its global step (a non-local
    pool's attention on the whole token grid); every later step holds its global state (token weights), and its
    pooling step counts no attention of its own. The input image is read patch by patch (only the crop is counted, as
    MCUNetV2 counts it). The ``tflm`` accounting counts the deployed graph (``tflm_profile``), which holds the whole
    input image, as TFLite Micro does."""
    if split is None:
        return lowest_patched_profile(model, input_size, patches, dtype, accounting)[1]
    if accounting == 'tflm':  # the deployed model's patch-based graph, as TFLite Micro plans it
        return tflm_profile(deployed_patch_based(meta_copy(model), input_size, patches, split), input_size,
                            itemsize_of(dtype))
    wrapped = PatchBased(model, patches, split)
    plan = wrapped.plan(input_size)
    h, w = plan.max_patch
    itemsize = itemsize_of(dtype)
    first = activation_profile(wrapped.prefix, (input_size[0], h, w), dtype=dtype, accounting=accounting)
    with torch.no_grad():
        out_chs = meta_copy(wrapped.prefix)(torch.empty(1, input_size[0], h, w, device='meta')).shape[1]
    steps, state = [], 0
    names = [tp.name for tp in plan.two_pass]
    for tp in plan.two_pass:
        pool: PoolLayer = wrapped.prefix.get_submodule(tp.name)
        assembled, state_numel = pool.two_pass_numel(tp.in_size)
        before = first.layers[:next((i for i, layer in enumerate(first.layers) if layer.name.startswith(tp.name)),
                                    len(first.layers))]
        steps += [dataclasses.replace(layer, name=f'{tp.label}-pass:{layer.name}',
                                      held_bytes=layer.held_bytes + (assembled + state) * itemsize)
                  for layer in before]
        global_step = pool.global_step(tp.in_size)
        if global_step is not None:
            module, shape = global_step
            profile = activation_profile(module, shape, dtype=dtype, accounting=accounting)
            steps += [dataclasses.replace(layer, name=f'attention:{tp.name}.{layer.name}',
                                          held_bytes=layer.held_bytes + state * itemsize) for layer in profile.layers]
        state += state_numel
    assembled = out_chs * plan.out_size[0] * plan.out_size[1] * itemsize
    steps += [dataclasses.replace(layer, name=f'patch:{layer.name}',
                                  held_bytes=layer.held_bytes + assembled + state * itemsize)
              for layer in first.layers if not any(layer.name.startswith(f'{n}.') for n in names)]
    rest = activation_profile(Units(model, wrapped.rest.units, head=True), (out_chs, *plan.out_size), dtype=dtype,
                              accounting=accounting)
    return ActivationProfile(steps + rest.layers, accounting)


def deployed_patch_based(model: nn.Module, input_size: Tuple[int, int, int], patches: int, split: str,
                         chunk: Optional[int] = DEFAULT_CHUNK, widen: bool = True) -> 'PatchBased':
    """``model`` as it is deployed on ``patches x patches`` patches to ``split``: its export form
    (``export_form_model``, each layer's schedule chosen on this patch-based graph: ``choose_schedules``) run by
    ``PatchBased``, planned for ``input_size``.

    Args:
        model: The model (copied).
        input_size: Its input (C, H, W).
        patches: Patches per side.
        split: The last unit of the prefix.
        chunk: Query rows at a time of the non-local attention over the most tokens.
        widen: Pad stride-2 convolutions as TFLite pads.
    """
    form = export_form_model(model, input_size, chunk, widen)
    wrapped = PatchBased(form, patches, split)
    wrapped.plan(input_size)
    choose_schedules(form, input_size, wrapped)
    return wrapped


def lowest_patched_profile(
        model: nn.Module,
        input_size: Tuple[int, int, int] = (3, 224, 224),
        patches: int = 4,
        dtype: Union[torch.dtype, str] = torch.float32,
        accounting: str = 'mcunet',
) -> Tuple[str, ActivationProfile]:
    """The split with the lowest patch-based peak among the units the prefix can reach (the first of equal ones),
    and its ``patched_profile``; a ValueError if not even the first unit can be run patch by patch."""
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
    wrapped = patch_based(model, patches, split)
    wrapped.plan(input_size)  # the plan's own meta runs are not part of the execution
    return count_macs(wrapped, input_size)


def patch_based(model: nn.Module, patches: int = 4, split: Optional[str] = None) -> PatchBased:
    """Run ``model``'s high-resolution prefix on a ``patches`` x ``patches`` grid of overlapping input patches.

    Args:
        model: a timm ResNet or MobileNetV2 (stock or one of timm-nlp's), in eval mode.
        patches: patches a side.
        split: the last unit of the prefix (``timm_nlp.patching.model_units(model)``: e.g. ``'layer1'``,
            ``'blocks.2'``); by default the one with the lowest patch-based peak (mcunet accounting) at 224 x 224.

    Returns:
        A module with ``model``'s outputs (the same modules, no copy). A prefix with a layer that needs the whole
        map (attention over full-resolution tokens, dynamic convolutions, squeeze-excitation) raises a ValueError
        naming it.
    """
    _check_patches(patches)
    if split is None:
        split = lowest_patched_profile(model, (3, 224, 224), patches)[0]
    return PatchBased(model, patches, split)
