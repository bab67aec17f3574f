"""Patch-based execution (MCUNetV2, Lin et al., NeurIPS 2021): the high-resolution prefix of a network run on an
n x n grid of overlapping input patches, each with the halo its receptive field needs, the prefix's output assembled,
the rest of the network run on it as usual. Only one patch's activations and the assembled output are live in the
prefix, which is where layer-by-layer execution peaks.
"""
import contextlib
import functools
import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['patch_based', 'PatchBased', 'PatchPlan', 'patch_plan', 'model_units']


def model_units(model: nn.Module) -> List[str]:
    """The names of the modules that ``model.forward_features`` runs one after the other (timm's ResNet and
    EfficientNet/MobileNetV2 layouts)."""
    if hasattr(model, 'layer1') and hasattr(model, 'conv1'):
        names = ['conv1', 'bn1', 'act1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4']
    elif hasattr(model, 'conv_stem') and hasattr(model, 'blocks'):
        names = ['conv_stem', 'bn1'] + [f'blocks.{i}' for i in range(len(model.blocks))] + ['conv_head', 'bn2']
    else:
        raise TypeError(f'patch-based execution takes timm ResNet and EfficientNet/MobileNetV2 models, not '
                        f'{type(model).__name__}.')
    return [n for n in names if _has(model, n)]


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _check_local(prefix: nn.Module) -> None:
    """Raise if a layer of the prefix needs more than a bounded neighbourhood of its input."""
    from .layers import DeformConv2d, DynamicConv2d, GaussianPool2d, WeightedPool2d
    for name, m in prefix.named_modules():
        why = None
        if isinstance(m, WeightedPool2d) and m.nlp is not None:
            if m.local is not None:
                why = "mixp's local term is not run patch by patch"
            elif m.nlp.deformable:
                why = 'its deformable embedding samples at unbounded offsets'
            elif m.nlp.patch_size == 1:
                why = 'its attention mixes the tokens of the full-resolution map (p = 1)'
            elif m.nlp.dynamic:
                why = 'its dynamic restore conv is routed by the mean of the whole map'
            elif m.ceil_mode:
                why = 'its ceil-mode windows are not run patch by patch'
            else:
                why = None
        elif isinstance(m, GaussianPool2d) and m.ceil_mode:
            why = 'its ceil-mode windows are not run patch by patch'
        elif isinstance(m, DynamicConv2d):
            why = 'its kernel mixture is routed by a global average of its input'
        elif isinstance(m, DeformConv2d):
            why = 'its sampling offsets are unbounded'
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or type(m).__name__ in (
                'SqueezeExcite', 'SEModule', 'EffectiveSEModule', 'SelectAdaptivePool2d'):
            why = 'it pools the whole map'
        if why:
            raise ValueError(f"the prefix cannot be run patch by patch exactly: '{name}' ({type(m).__name__}) needs "
                             f'the whole map: {why}. Choose an earlier split.')


@dataclass
class NonLocalPass:
    """A pool of the prefix with a global branch, run in two passes: a non-local pool's tokens embedded patch by
    patch (each token from a patch in which its halo is complete), then attention on the assembled token grid; a
    Gaussian pool's mean of its input summed patch by patch (each patch its own part), then its global branch;
    then the pooling, patch by patch, with those weights."""
    name: str
    kind: str
    stride_in: int
    in_size: Tuple[int, int]
    halo_before: int
    patch_size: int


def _spatial_ops(prefix: nn.Module, input_size: Tuple[int, int, int]) -> Tuple[List[int], List[NonLocalPass]]:
    """Of every padded op of the prefix in execution order (a meta forward): how far, in image pixels, the zero padding
    at an inner edge of a crop reaches into its output (its padding on one side, its extent less the padding on the
    other, times its input's stride); and the prefix's non-local pools."""
    from .layers import GaussianPool2d, WeightedPool2d
    reach, pools, hooks = [], [], []
    H = input_size[1]
    names = {m: n for n, m in prefix.named_modules()}

    def record(m, inputs, output):
        stride_in = H // inputs[0].shape[-2]
        if isinstance(m, (WeightedPool2d, GaussianPool2d)):  # windows of its stride, no padding: no halo of its own
            nlp = isinstance(m, WeightedPool2d)
            pools.append(NonLocalPass(names[m], 'nlp' if nlp else 'gaussian', stride_in, tuple(inputs[0].shape[-2:]),
                                      sum(reach), m.nlp.patch_size if nlp else 1))
            return
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
    for m in prefix.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            hooks.append(m.register_forward_hook(record))
        elif isinstance(m, GaussianPool2d) or isinstance(m, WeightedPool2d) and m.nlp is not None:
            hooks.append(m.register_forward_pre_hook(lambda m, inputs: record(m, inputs, None)))
    with torch.no_grad():
        prefix(torch.empty(1, *input_size, device='meta'))
    for h in hooks:
        h.remove()
    return reach, pools


@dataclass
class PatchPlan:
    """Where the patches of a prefix lie: the output ranges of each row and column of patches and the input crops
    that compute them (rows and columns alike, as (start, end) pairs), the prefix's stride and halo."""
    split: str
    stride: int
    halo: int
    out_size: Tuple[int, int]
    out_rows: List[Tuple[int, int]]
    out_cols: List[Tuple[int, int]]
    in_rows: List[Tuple[int, int]]
    in_cols: List[Tuple[int, int]]
    in_size: Tuple[int, int] = (0, 0)
    non_local: Tuple[NonLocalPass, ...] = ()

    @property
    def max_patch(self) -> Tuple[int, int]:
        """The largest input crop, rows by columns."""
        return max(b - a for a, b in self.in_rows), max(b - a for a, b in self.in_cols)


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


def patch_plan(model: nn.Module, input_size: Tuple[int, int, int], patches: int, split: str) -> PatchPlan:
    """The patches of ``model``'s prefix up to and including the unit ``split`` for one input size."""
    units = model_units(model)
    if split not in units:
        raise ValueError(f"split '{split}' is not one of the model's units: {', '.join(units)}.")
    prefix = _Units(model, units[:units.index(split) + 1])
    _check_local(prefix)
    from .profiler import meta_copy
    meta = meta_copy(prefix, drop_hooks=True)  # the plan's meta runs are not forwards: no user hooks
    C, H, W = input_size

    def out_hw(h, w):
        with torch.no_grad(), _shape_only(meta):
            return meta(torch.empty(1, C, h, w, device='meta')).shape[-2:]
    big = 64 * max(H, W)
    h1, h2 = out_hw(big, big)[0], out_hw(2 * big, 2 * big)[0]
    stride = round(big / (h2 - h1))
    with _shape_only(meta):
        reach, pools = _spatial_ops(meta, (C, big, big))
        sized = {p.name: p for p in _spatial_ops(meta, input_size)[1]}
    # crops start (and, inside the map, end) on a grid of the prefix's stride and of every non-local pool's tokens
    align = math.lcm(stride, *[p.patch_size * p.stride_in for p in pools])
    halo = max([sum(reach)] + [p.halo_before + p.patch_size * p.stride_in for p in pools])
    halo = -(-halo // align) * align
    Ho, Wo = out_hw(H, W)
    non_local = []
    for p in pools:  # at this input size, the token grid must tile the map
        hp, wp = sized[p.name].in_size
        q = p.patch_size
        if hp % q or wp % q:
            raise ValueError(f"the prefix cannot be run patch by patch exactly: the {q} x {q} tokens of '{p.name}' "
                             f'do not tile its {hp} x {wp} input. Choose an input size or split that they tile.')
        non_local.append(dataclasses.replace(p, in_size=(hp, wp)))
    out_rows, in_rows = _ranges(Ho, patches, stride, halo, H, align)
    out_cols, in_cols = _ranges(Wo, patches, stride, halo, W, align)
    return PatchPlan(split, stride, halo, (Ho, Wo), out_rows, out_cols, in_rows, in_cols, (H, W), tuple(non_local))


@contextlib.contextmanager
def _shape_only(prefix: nn.Module):
    """Non-local and Gaussian pools computed as window averages (the same output shape, no attention): for the plan's
    meta runs at any size."""
    from .layers import GaussianPool2d, WeightedPool2d, window_avg_pool2d
    pools = {n: m for n, m in prefix.named_modules()
             if isinstance(m, GaussianPool2d) or isinstance(m, WeightedPool2d) and m.nlp is not None}
    with _replaced_forwards(prefix, {n: (lambda inp, m=m: window_avg_pool2d(inp, m.stride)) for n, m in pools.items()},
                            []):
        yield


class _Stop(Exception):
    """Ends a token-collecting pass once its non-local pool has its tokens."""


def _gaussian_pool(inp: torch.Tensor, pool: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A Gaussian pool in eval with its global branch's ``softplus(MU)`` given: ``mean + W * std`` of every window."""
    from .layers import window_avg_pool2d
    from .layers.gaussian_pool import _window_variance
    xf = inp.to(torch.promote_types(inp.dtype, torch.float32))
    mean = window_avg_pool2d(xf, pool.stride)
    std = _window_variance(xf, mean, pool.stride, False).clamp(min=pool.eps).sqrt()
    return (mean + weight * std).to(inp.dtype)


@contextlib.contextmanager
def _replaced_forwards(prefix: nn.Module, forwards: dict, crop: list):
    """Replace the forward of the named modules of ``prefix`` (each a function of the input and the current crop)."""
    modules = {name: prefix.get_submodule(name) for name in forwards}
    try:
        for name, m in modules.items():
            fn = forwards[name]
            m.forward = (lambda inp, fn=fn: fn(inp, crop=crop)) if 'crop' in inspect.signature(fn).parameters \
                else fn
        yield
    finally:
        for m in modules.values():
            m.__dict__.pop('forward', None)


class _Units(nn.Module):
    """Units of ``model`` run one after the other, registered under their own names (so that profiles name them as
    the model does), then, with ``head``, the model's ``forward_head`` (its head modules registered too)."""

    def __init__(self, model: nn.Module, units: Sequence[str], head: bool = False):
        super().__init__()
        self.units = list(units)
        for name in self.units:
            parent = self
            *path, leaf = name.split('.')
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, model.get_submodule(name))
        self.head = head
        if head:
            for name, child in model.named_children():
                if name not in {u.split('.')[0] for u in model_units(model)} and not hasattr(self, name):
                    self.add_module(name, child)
        self.__dict__['_model'] = model  # not a child: its head modules are, under their names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.units:
            x = self.get_submodule(name)(x)
        return self._model.forward_head(x) if self.head else x


class PatchBased(nn.Module):
    """``model`` with its prefix (up to and including the unit ``split``) run patch by patch.

    The prefix is run on ``patches`` x ``patches`` overlapping input crops whose output ranges tile its output map;
    each crop reaches a halo beyond its part (the sum of how far each padded layer's zero padding reaches, in input
    pixels, rounded up to the prefix's stride; crops start on the stride's grid) so the zero padding at a crop's
    inner edges reaches only outputs that are discarded. Modules are shared with ``model`` (no copy); inference only.
    """

    def __init__(self, model: nn.Module, patches: int = 4, split: Optional[str] = None):
        super().__init__()
        self.train(model.training)
        if patches < 1:
            raise ValueError(f'patches must be at least 1, not {patches}.')
        units = model_units(model)
        self.model = model
        self.patches = patches
        if split is None:  # the lowest patch-based peak (mcunet accounting) at 224 x 224
            from .profiler import lowest_patched_profile
            split = lowest_patched_profile(model, (3, 224, 224), patches)[0]
        self.split = split
        if self.split not in units:
            raise ValueError(f"split '{self.split}' is not one of the model's units: {', '.join(units)}.")
        i = units.index(self.split) + 1
        self._plans = {}
        self.prefix = _Units(model, units[:i])
        self.rest = _Units(model, units[i:])
        _check_local(self.prefix)

    def plan(self, input_size: Tuple[int, int, int]) -> PatchPlan:
        """The patches for one input size (computed once per size)."""
        if input_size not in self._plans:
            self._plans[input_size] = patch_plan(self.model, input_size, self.patches, self.split)
        return self._plans[input_size]

    def _patches(self, plan: PatchPlan):
        for (o0, o1), (a0, a1) in zip(plan.out_rows, plan.in_rows):
            for (p0, p1), (b0, b1) in zip(plan.out_cols, plan.in_cols):
                yield (o0, o1, p0, p1), (a0, a1, b0, b1)

    def _first_pass(self, x: torch.Tensor, plan: PatchPlan, forwards: dict, crop: list, own: list) -> None:
        """Every patch's prefix up to a collecting forward (which raises ``_Stop``), with ``crop`` the patch's input
        crop and ``own`` its output ranges while it runs."""
        with _replaced_forwards(self.prefix, forwards, crop):
            for outs, window in self._patches(plan):
                crop[:], own[:] = [window], [outs]
                try:
                    self.prefix(x[:, :, window[0]:window[1], window[2]:window[3]])
                except _Stop:
                    pass

    def _collect_tokens(self, x: torch.Tensor, plan: PatchPlan, nl: NonLocalPass, apply: dict) -> torch.Tensor:
        """The embedded tokens of the non-local pool ``nl`` over the whole map, each from a patch in which its halo is
        complete (earlier non-local pools applying their token weights)."""
        pool = self.prefix.get_submodule(nl.name)
        q, si = nl.patch_size, nl.stride_in
        H, W = plan.in_size
        tokens: List[Optional[torch.Tensor]] = [None]
        covered = torch.zeros(nl.in_size[0] // q, nl.in_size[1] // q, dtype=torch.bool)
        crop: List[Tuple[int, int, int, int]] = []

        def valid(g0: int, n: int, a: int, b: int, size: int) -> Tuple[int, int]:
            lo = a + nl.halo_before if a > 0 else 0
            hi = b - nl.halo_before if b < size else size + q * si
            first = max(g0, -(-lo // (q * si)))
            return first, max(first, min(g0 + n, hi // (q * si)))

        def collect(inp: torch.Tensor) -> torch.Tensor:
            t, _ = pool.nlp._embed(inp)
            a0, a1, b0, b1 = crop[0]
            g0, h0 = a0 // si // q, b0 // si // q
            r0, r1 = valid(g0, t.shape[-2], a0, a1, H)
            c0, c1 = valid(h0, t.shape[-1], b0, b1, W)
            if tokens[0] is None:
                tokens[0] = t.new_empty(t.shape[0], t.shape[1], *covered.shape)
            tokens[0][:, :, r0:r1, c0:c1] = t[:, :, r0 - g0:r1 - g0, c0 - h0:c1 - h0]
            covered[r0:r1, c0:c1] = True
            raise _Stop
        self._first_pass(x, plan, dict(apply, **{nl.name: collect}), crop, [])
        assert bool(covered.all()), f'tokens of {nl.name} left uncovered by the patches: the halo is too small'
        return tokens[0]

    def _collect_mean(self, x: torch.Tensor, plan: PatchPlan, nl: NonLocalPass, apply: dict) -> torch.Tensor:
        """The mean of a Gaussian pool's input over the whole map, each patch summing its own part."""
        si = nl.stride_in
        total: List[torch.Tensor] = []
        crop: List[Tuple[int, int, int, int]] = []
        own: List[Tuple[int, int, int, int]] = []

        s = plan.stride // si
        last_row, last_col = plan.out_rows[-1][1], plan.out_cols[-1][1]

        def collect(inp: torch.Tensor) -> torch.Tensor:
            (a0, _, b0, _), (o0, o1, p0, p1) = crop[0], own[0]
            # the patch's own part of the pool's input (the last row and column of patches to the map's end)
            r0, r1 = o0 * s, nl.in_size[0] if o1 == last_row else o1 * s
            c0, c1 = p0 * s, nl.in_size[1] if p1 == last_col else p1 * s
            part = inp[:, :, r0 - a0 // si:r1 - a0 // si, c0 - b0 // si:c1 - b0 // si]
            total.append(part.to(torch.promote_types(part.dtype, torch.float32)).sum((2, 3), keepdim=True))
            raise _Stop
        self._first_pass(x, plan, dict(apply, **{nl.name: collect}), crop, own)
        return torch.stack(total).sum(0) / (nl.in_size[0] * nl.in_size[1])

    def _token_weights(self, x: torch.Tensor, plan: PatchPlan) -> dict:
        """The pooling functions of the two-pass pools of the prefix, with the weights of the whole map."""
        from .layers import upsample_nearest, weighted_pool2d, window_avg_pool2d
        apply = {}
        for nl in plan.non_local:
            pool = self.prefix.get_submodule(nl.name)
            if nl.kind == 'gaussian':
                mean = self._collect_mean(x, plan, nl, apply)
                softplus = torch.nn.functional.softplus(pool.mu(pool.hidden(mean.to(x.dtype))))
                apply[nl.name] = functools.partial(_gaussian_pool, pool=pool, weight=softplus)
                continue
            t = self._collect_tokens(x, plan, nl, apply)
            weights = pool.nlp.weights_of_tokens(t, nl.in_size)
            constant = pool.patches_of_windows  # the whole map is tiled by its tokens (checked by the plan)

            def pooled(inp: torch.Tensor, pool=pool, nl=nl, weights=weights, constant=constant, crop=None):
                a0, _, b0, _ = crop[0]
                q, si = nl.patch_size, nl.stride_in
                g0, h0 = a0 // si // q, b0 // si // q
                w = weights[:, :, g0:g0 + inp.shape[-2] // q, h0:h0 + inp.shape[-1] // q]
                if constant and pool.win_norm:  # as the pool itself computes it: the weights cancel
                    return window_avg_pool2d(inp, pool.stride)
                return weighted_pool2d(inp, upsample_nearest(w, (inp.shape[-2], inp.shape[-1])), pool.stride,
                                       pool.win_norm)
            apply[nl.name] = pooled
        return apply

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            raise RuntimeError('patch-based execution is for inference: call .eval() first (batch norms in training '
                               'mode use the statistics of each patch).')
        plan = self.plan(tuple(x.shape[1:]))
        apply = self._token_weights(x, plan)
        out = None
        s = plan.stride
        crop: List[Tuple[int, int, int, int]] = []
        with _replaced_forwards(self.prefix, apply, crop):
            for (o0, o1, p0, p1), (a0, a1, b0, b1) in self._patches(plan):
                crop[:] = [(a0, a1, b0, b1)]
                y = self.prefix(x[:, :, a0:a1, b0:b1])
                if out is None:
                    out = y.new_empty(y.shape[0], y.shape[1], *plan.out_size)
                out[:, :, o0:o1, p0:p1] = y[:, :, o0 - a0 // s:o1 - a0 // s, p0 - b0 // s:p1 - b0 // s]
        return self.rest(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.forward_features(x))


def patch_based(model: nn.Module, patches: int = 4, split: Optional[str] = None) -> PatchBased:
    """Run ``model``'s high-resolution prefix on a ``patches`` x ``patches`` grid of overlapping input patches.

    Args:
        model: a timm ResNet or MobileNetV2 (stock or one of timm-nlp's), in eval mode.
        patches: patches a side.
        split: the last unit of the prefix (``timm_nlp.patching.model_units(model)``: e.g. ``'layer1'``,
            ``'blocks.2'``); by default the one with the lowest patch-based peak at 224 x 224.

    Returns:
        A module with ``model``'s outputs (the same modules, no copy). A prefix with a layer that needs the whole
        map (attention, Gaussian pooling's global branch, dynamic convolutions) raises a ValueError naming it.
    """
    return PatchBased(model, patches, split)
