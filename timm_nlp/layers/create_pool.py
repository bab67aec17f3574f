"""Pooling-layer factory: ``create_pool2d('nlp_headfix2_nowin_reduced', channels=64, stride=2)``, and the defaults
of the non-local methods by network stage, as the paper's code sets them."""
from functools import partial
from typing import Any, Dict, Optional

from torch import nn

from timm_nlp.grammar import PoolSpec
from .dynamic_conv import DynamicConv2d
from .gaussian_pool import GaussianPool2d
from .weighted_pool import WeightedPool2d
from .window_pool import WindowAvgPool2d, WindowMaxPool2d

__all__ = ['create_pool2d', 'stage_pool_args', 'prepool_args', 'STAGE_HEADS', 'REDUCED_PATCH_SIZES']

# by stage index, not by width: ResNet stages 1-4, MobileNetV2 stages 1-7
STAGE_HEADS = {'resnet': (4, 8, 16, 32), 'mobilenetv2': (2, 4, 8, 16, 32, 64, 128)}
REDUCED_PATCH_SIZES = {'resnet': (4, 2, 1, 1), 'mobilenetv2': (4, 4, 4, 2, 2, 1, 1)}


def stage_pool_args(pool: PoolSpec, family: str, stage: int) -> Dict[str, Any]:
    """Patch size, embedding ratio and heads of a non-local pool of stage ``stage`` (0-based) of a ``family``
    ('resnet' or 'mobilenetv2') network: p = 1 (``reduced``: by stage), ratio 1, heads by stage (``headfix2``: 2)."""
    return dict(
        patch_size=REDUCED_PATCH_SIZES[family][stage] if pool.reduced else 1,
        embed_ratio=1.,
        num_heads=2 if pool.headfix2 else STAGE_HEADS[family][stage],
    )


def prepool_args(pool: PoolSpec, stride: int) -> Dict[str, Any]:
    """The non-local arguments of a stem pre-pool of stride ``stride``: p = 2, ratio 1, 8 heads; ``reduced``:
    p = stride, ratio 1/4; ``headfix2``: 2 heads."""
    return dict(
        patch_size=stride if pool.reduced else 2,
        embed_ratio=0.25 if pool.reduced else 1.,
        num_heads=2 if pool.headfix2 else 8,
    )


def create_pool2d(
        name: str,
        channels: int,
        stride: int = 2,
        patch_size: Optional[int] = None,
        embed_ratio: Optional[float] = None,
        num_heads: Optional[int] = None,
        dynamic: bool = False,
        dynamic_kernels: int = 4,
        dynamic_temperature: float = 34.,
        ceil_mode: bool = False,
        pos_size: int = 256,
        device=None,
        dtype=None,
) -> nn.Module:
    """Build a pooling layer by name, a drop-in replacement for ``nn.MaxPool2d(stride)``.

    Args:
        name: ``METHOD[_MODIFIER...]``: maxp, avgp, lip, gaussian_pool, nlp, dfmnlp, mixp, dfmixp; modifiers
            headfix2, nowin, reduced (non-local methods only). ``skip`` is not a layer: it stands for a network's own
            strided convolution.
        channels: Channels C of the pooled map.
        stride: Down-sampling factor s; the output is ``H // s x W // s`` (at least 1; see ``ceil_mode``).
        patch_size: Non-local methods: tokens of p x p pixels. The defaults of ``patch_size``, ``embed_ratio`` and
            ``num_heads`` are those of the first ResNet stage in the paper's code (``stage_pool_args``).
        embed_ratio: Non-local methods: embedding width relative to C.
        num_heads: Non-local methods: attention heads.
        dynamic: Non-local methods: dynamic convolutions in the embedding, restore, deformable and local branches,
            as in the paper's ``dy`` networks.
        ceil_mode: ``ceil(H / s)`` windows, partial at the edges.
        pos_size: Non-local methods: rows of the learned position tables (the token grid's largest side).

    Returns:
        The pooling module.
    """
    spec = PoolSpec.parse(name)
    for arg, val in (('channels', channels), ('stride', stride)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f'create_pool2d({name!r}): {arg} must be an integer >= 1, got {val!r}.')
    overrides = dict(patch_size=patch_size, embed_ratio=embed_ratio, num_heads=num_heads)
    given = sorted(k for k, v in overrides.items() if v is not None)
    if given and not spec.is_nonlocal:
        raise ValueError(f"create_pool2d({name!r}): {', '.join(given)} apply to the non-local methods only.")
    dd = {'device': device, 'dtype': dtype}
    if spec.method == 'skip':
        raise ValueError("create_pool2d('skip'): skip is not a pooling layer; it keeps the network's own strided "
                         'convolution. Valid layers: maxp, avgp, lip, gaussian_pool, nlp, dfmnlp, mixp, dfmixp.')
    if spec.method == 'maxp':
        return WindowMaxPool2d(stride, ceil_mode)
    if spec.method == 'avgp':
        return WindowAvgPool2d(stride, ceil_mode)
    if spec.method == 'gaussian_pool':
        return GaussianPool2d(channels, stride, ceil_mode=ceil_mode, **dd)
    if spec.method == 'lip':
        return WeightedPool2d(channels, stride, local_kernel=1, ceil_mode=ceil_mode, **dd)
    non_local = dict(stage_pool_args(spec, 'resnet', 0), **{k: v for k, v in overrides.items() if v is not None})
    non_local.update(deformable=spec.method in ('dfmnlp', 'dfmixp'), pos_size=pos_size)
    conv_layer = partial(DynamicConv2d, num_kernels=dynamic_kernels, temperature=dynamic_temperature) \
        if dynamic else nn.Conv2d
    local_kernel = non_local['patch_size'] if spec.method in ('mixp', 'dfmixp') else None
    return WeightedPool2d(channels, stride, local_kernel=local_kernel, non_local=non_local, win_norm=not spec.nowin,
                          ceil_mode=ceil_mode, conv_layer=conv_layer, **dd)
