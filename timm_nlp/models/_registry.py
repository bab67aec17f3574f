"""Registration of the pooled architectures in timm's model registry.

For every backbone and its ``dy`` variant: the grid of ``GRID_POOLS`` x three stride patterns (stock, first
stage at 2, first stage at 4), a generic entrypoint ``[dy]{prefix}_pooled`` configured by kwargs (so any
grammar string reaches timm's ``train.py`` through ``--model-kwargs``), and the paper's example architecture
strings, registered verbatim and under their timm-form names.
"""
import fnmatch
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from torch import nn

from timm.models import generate_default_cfgs, register_model

from timm_nlp.grammar import BACKBONES, ArchSpec
from ._pooled import pooled_cfg

__all__ = [
    'GRID_POOLS', 'PAPER_EXAMPLES', 'grid_specs', 'generic_name', 'register_family', 'create_model',
    'list_pooled_models',
]

GRID_POOLS = (
    'skip', 'maxp', 'avgp', 'lip', 'gaussian_pool', 'nlp', 'nlp_headfix2', 'nlp_headfix2_nowin', 'nlp_reduced',
    'nlp_headfix2_nowin_reduced', 'dfmnlp', 'mixp', 'dfmixp',
)
# the architecture strings used in the examples of the paper's code
PAPER_EXAMPLES = (
    'resnet18-nlp-1222', 'resnet18-nlp_headfix2-2222', 'resnet18-nlp_headfix2-4222',
    'mobilenet_v2-nlp_headfix2-1222121', 'mobilenet_v2-nlp_headfix2-2222121', 'mobilenet_v2-nlp_headfix2-4222121',
    'mobilenet_v2-gaussian_pool-4222121', 'MOBILENET-SKIP-1222121', 'resnet18-nlp_reduced-1222',
    'resnet18-nlp_headfix2_nowin_reduced-1222', 'resnet18-nlp_headfix2_nowin_reduced-2222',
    'dyresnet18-dfmnlp_reduced-1222', 'dyresnet18-skip-1222', 'dymobilenet_v2-nlp_headfix2-1222121',
    'PREPOOL-NLP_HEADFIX2-4-RESNET18-SKIP-1222', 'prepool-nlp_headfix2-4-resnet18-nlp_headfix2-1222',
    'prepool-maxp-4-resnet50-skip-1222', 'prepool-lip-8-resnet18-skip-1222',
)

CreateFn = Callable[..., nn.Module]
_REGISTERED: List[str] = []


def grid_specs(backbone: str, dynamic: bool) -> List[ArchSpec]:
    """The registered grid of one backbone: every grid pool x (stock, first stage 2, first stage 4)."""
    stock = BACKBONES[backbone].stock
    return [ArchSpec(backbone, pool, first + stock[1:], dynamic) for pool in GRID_POOLS for first in '124']


def generic_name(backbone: str, dynamic: bool) -> str:
    return f"{'dy' if dynamic else ''}{BACKBONES[backbone].prefix}_pooled"


def _entrypoint(name: str, module: str, fn: Callable[..., nn.Module], doc: str) -> Callable[..., nn.Module]:
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = module
    fn.__doc__ = doc
    _REGISTERED.append(name)
    return register_model(fn)


def list_pooled_models(pattern: str = '*') -> List[str]:
    """Registered names of timm-nlp (grid, generic entrypoints and paper examples) matching a glob pattern."""
    return sorted(n for n in _REGISTERED if fnmatch.fnmatchcase(n.lower(), pattern.lower()))


def register_family(module: str, backbones: Iterable[str], create_fn: CreateFn) -> Dict[str, Any]:
    """Register every architecture of ``backbones`` under ``module`` (a timm model module name).

    Args:
        module: ``__name__`` of the family module; its last component becomes timm's module name.
        backbones: Canonical seed backbone names built by this family.
        create_fn: ``create_fn(variant, arch, pretrained=False, **kwargs)`` building the model.

    Returns:
        The family's default cfgs (also set as ``default_cfgs`` of the module, where timm looks for them).
    """
    named: Dict[str, ArchSpec] = {}
    generic: Dict[str, ArchSpec] = {}
    for backbone in backbones:
        for dynamic in (False, True):
            for spec in grid_specs(backbone, dynamic):
                named[spec.timm_name] = spec
            generic[generic_name(backbone, dynamic)] = ArchSpec(backbone, 'skip', BACKBONES[backbone].stock, dynamic)
    for seed in PAPER_EXAMPLES:
        spec = ArchSpec.from_seed(seed)
        if spec.backbone in backbones:
            named[seed] = spec
            named.setdefault(spec.timm_name, spec)
    cfgs = generate_default_cfgs({name: pooled_cfg(spec) for name, spec in {**named, **generic}.items()})
    sys.modules[module].default_cfgs = cfgs

    for name, spec in named.items():
        def entry(pretrained: bool = False, _name: str = name, _spec: ArchSpec = spec, **kwargs: Any) -> nn.Module:
            return create_fn(_name, _spec, pretrained, **kwargs)
        _entrypoint(name, module, entry, f'{spec.seed} (timm name {spec.timm_name}).')

    for name, stock in generic.items():
        def entry(
                pretrained: bool = False,
                pool: str = 'skip',
                strides: Optional[Union[str, int, tuple]] = None,
                prepool: Optional[str] = None,
                prepool_stride: int = 4,
                _name: str = name,
                _stock: ArchSpec = stock,
                **kwargs: Any,
        ) -> nn.Module:
            spec = ArchSpec(_stock.backbone, pool, _stock.strides if strides is None else strides, _stock.dynamic,
                            prepool, prepool_stride if prepool is not None else None)
            cfg = pooled_cfg(spec)
            overlay = dict(pool_size=cfg['pool_size'], description=cfg['description'])
            overlay.update(kwargs.pop('pretrained_cfg_overlay', None) or {})
            return create_fn(_name, spec, pretrained, pretrained_cfg_overlay=overlay, **kwargs)
        _entrypoint(name, module, entry,
                    f'Generic {stock.backbone}{" (dynamic convs)" if stock.dynamic else ""}: '
                    f'kwargs pool=, strides=, prepool=, prepool_stride= set the architecture.')
    return cfgs


def create_model(arch: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build any architecture of the grammar, by seed string or timm name (``name.tag`` for pretrained tags).

    Registered names go through ``timm.create_model`` unchanged; any other valid string is built by its
    backbone's generic entrypoint with the architecture as kwargs.
    """
    import timm
    if timm.is_model(arch):
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    name, dot, tag = arch.partition('.')
    spec = ArchSpec.parse(name)
    if timm.is_model(spec.timm_name):
        return timm.create_model(spec.timm_name + dot + tag, pretrained=pretrained, **kwargs)
    if dot:
        raise ValueError(f"No pretrained tag '{tag}' for '{name}': it is not a registered model name.")
    return timm.create_model(generic_name(spec.backbone, spec.dynamic), pretrained=pretrained,
                             **spec.model_kwargs(), **kwargs)
