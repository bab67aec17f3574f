"""Pooling-layer factory: ``create_pool2d('nlp_headfix2_nowin_reduced', channels=64, stride=2)``."""
from typing import Any, Dict

from torch import nn

from timm_nlp.grammar import PoolSpec
from .gaussian_pool import GaussianPool2d
from .weighted_pool import WeightedPool2d
from .window_pool import WindowAvgPool2d

__all__ = ['create_pool2d', 'nlp_defaults']

_NLP_ARGS = ('patch_size', 'embed_ratio', 'num_heads', 'pos_size')


def nlp_defaults(spec: PoolSpec, channels: int, reduction: int = 4) -> Dict[str, Any]:
    """DESIGN's defaults for the non-local importance of a map with ``channels`` at ``reduction``.

    plain: p=1, ratio=1, heads=C//16 (>=1); ``headfix2``: heads=2; ``reduced``: ratio=1/4 and
    ``p = max(1, 32 // reduction)`` (a token grid of about 1/32 of the image side).
    """
    return dict(
        patch_size=max(1, 32 // reduction) if spec.reduced else 1,
        embed_ratio=0.25 if spec.reduced else 1.,
        num_heads=2 if spec.headfix2 else max(1, channels // 16),
        deformable=spec.method in ('dfmnlp', 'dfmixp'),
    )


def create_pool2d(
        name: str,
        channels: int,
        stride: int = 2,
        reduction: int = 4,
        device=None,
        dtype=None,
        **overrides: Any,
) -> nn.Module:
    """Build a pooling layer by name, a drop-in replacement for ``nn.MaxPool2d(stride)``.

    Args:
        name: ``METHOD[_MODIFIER...]``: skip, maxp, avgp, lip, gaussian_pool, nlp, dfmnlp, mixp, dfmixp;
            modifiers headfix2, nowin, reduced (non-local methods only).
        channels: Channels C of the pooled map.
        stride: Down-sampling factor s; the output is ``ceil(H / s) x ceil(W / s)``.
        reduction: Reduction r of the pooled map relative to the input image (the stage), which sets the
            ``reduced`` patch size. A layer built on its own assumes the first ResNet stage, r = 4.
        **overrides: Non-local arguments replacing the defaults: patch_size, embed_ratio, num_heads, pos_size.

    Returns:
        The pooling module. ``skip`` is the strided 3x3 convolution (C -> C) that pooling replaces.
    """
    spec = PoolSpec.parse(name)
    for arg, val in (('channels', channels), ('stride', stride), ('reduction', reduction)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f'create_pool2d({name!r}): {arg} must be an integer >= 1, got {val!r}.')
    unknown = set(overrides) - set(_NLP_ARGS)
    if unknown or (overrides and not spec.is_nonlocal):
        valid = ', '.join(_NLP_ARGS) if spec.is_nonlocal else 'none'
        raise ValueError(f"create_pool2d({name!r}): unexpected arguments {sorted(overrides)}; "
                         f"valid overrides for '{spec.method}': {valid}.")
    dd = {'device': device, 'dtype': dtype}
    if spec.method == 'skip':
        return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False, **dd)
    if spec.method == 'maxp':
        return nn.MaxPool2d(stride, stride, ceil_mode=True)
    if spec.method == 'avgp':
        return WindowAvgPool2d(stride)
    if spec.method == 'gaussian_pool':
        return GaussianPool2d(channels, stride, **dd)
    if spec.method == 'lip':
        return WeightedPool2d(channels, stride, local=True, **dd)
    non_local = {**nlp_defaults(spec, channels, reduction), **overrides}
    return WeightedPool2d(
        channels, stride, local=spec.method in ('mixp', 'dfmixp'), non_local=non_local, win_norm=not spec.nowin, **dd)
