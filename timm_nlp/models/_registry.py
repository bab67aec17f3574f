"""Registration of the pooled architectures in timm's model registry.

For every backbone and its ``dy`` variant: the grid of ``GRID_POOLS`` x three stride patterns (stock, first
stage at 2, first stage at 4), a generic entrypoint ``[dy]{prefix}_pooled`` configured by kwargs (so any
grammar string reaches timm's ``train.py`` through ``--model-kwargs``), and the paper's example architecture
strings, registered verbatim and under their timm-form names.
"""
import dataclasses
import fnmatch
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

from timm.models import PretrainedCfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from timm_nlp.grammar import BACKBONES, ArchSpec
from ._pooled import load_stock_source, pooled_cfg

__all__ = [
    'GRID_POOLS', 'PAPER_EXAMPLES', 'grid_specs', 'generic_name', 'register_family', 'create_model',
    'list_pooled_models', 'load_manifest', 'register_pretrained', 'MANIFEST_PATH',
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
_ENTRIES: Dict[str, Tuple[Callable[..., nn.Module], str, ArchSpec]] = {}  # name -> (entrypoint, module, spec)
_RUNTIME_MANIFEST: List[Dict[str, Any]] = []

MANIFEST_PATH = Path(__file__).parent / 'pretrained.json'
_MANIFEST_REQUIRED = ('model', 'tag', 'hf_hub_id')
_CFG_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}


def load_manifest() -> List[Dict[str, Any]]:
    """Published weights: the package manifest, the ``TIMM_NLP_MANIFEST`` file, and runtime registrations.

    Each entry names a registered ``model``, a ``tag`` and an ``hf_hub_id``, and may set pretrained-cfg fields
    (num_classes, input_size, mean, std, crop_pct, label_names, ...). There are no tags without weights.
    """
    entries = json.loads(MANIFEST_PATH.read_text())
    extra = os.environ.get('TIMM_NLP_MANIFEST')
    if extra:
        entries += json.loads(Path(extra).read_text())
    entries += _RUNTIME_MANIFEST
    for e in entries:
        missing = [k for k in _MANIFEST_REQUIRED if not e.get(k)]
        if missing:
            raise ValueError(f'Manifest entry {e} lacks {missing}.')
    return entries


def _cfgs_for(name: str, spec: ArchSpec, manifest: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The untagged cfg of ``name`` (no weights) and one cfg per published tag."""
    out = {name: pooled_cfg(spec)}
    for e in manifest:
        if e['model'] == name:
            fields = {k: tuple(v) if isinstance(v, list) and k != 'label_names' else v
                      for k, v in e.items() if k in _CFG_FIELDS}
            out[f"{name}.{e['tag']}"] = pooled_cfg(spec, **fields)
    return out


def register_pretrained(*entries: Dict[str, Any]) -> None:
    """Add published weights (manifest entries) to the registry at run time: ``name.tag`` becomes loadable."""
    for e in entries:
        if e.get('model') not in _ENTRIES:
            raise ValueError(f"Manifest entry for unknown model '{e.get('model')}'; see list_pooled_models().")
    _RUNTIME_MANIFEST.extend(entries)
    manifest = load_manifest()
    for name in dict.fromkeys(e['model'] for e in entries):
        fn, module, spec = _ENTRIES[name]
        sys.modules[module].default_cfgs.update(generate_default_cfgs(_cfgs_for(name, spec, manifest)))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # re-registering the same entrypoint with its new tags
            register_model(fn)


def _published() -> List[str]:
    return [f"{e['model']}.{e['tag']} ({e['hf_hub_id']})" for e in load_manifest()]


def _build(create_fn: CreateFn, name: str, spec: ArchSpec, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    """Build through ``create_fn``; refuse ``pretrained=True`` without weights; apply ``stock_weights``."""
    stock = kwargs.pop('stock_weights', None)
    if pretrained:
        cfg = resolve_pretrained_cfg(name, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        if not cfg.has_weights:
            published = _published()
            raise RuntimeError(
                f"No published weights for '{name}'. Published timm-nlp weights: "
                f"{', '.join(published) if published else 'none yet'}. To start from stock timm weights of its "
                f"base model, use timm.create_model('{name}', stock_weights='{spec.base_name}.<tag>') (e.g. "
                f"'{_default_tag(spec.base_name)}') or timm_nlp.load_stock_weights(model, "
                'state_dict); the pooling modules keep their initialisation.')
        if stock:
            raise ValueError('Use either pretrained=True or stock_weights=, not both.')
    model = create_fn(name, spec, pretrained, **kwargs)
    if stock:
        load_stock_source(model, stock)
    return model


def _default_tag(base: str) -> str:
    import timm
    tags = timm.list_pretrained(base + '.*')
    return tags[0] if tags else base


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
    manifest = load_manifest()
    cfgs = generate_default_cfgs({k: v for name, spec in {**named, **generic}.items()
                                  for k, v in _cfgs_for(name, spec, manifest).items()})
    sys.modules[module].default_cfgs = cfgs

    for name, spec in named.items():
        def entry(pretrained: bool = False, _name: str = name, _spec: ArchSpec = spec, **kwargs: Any) -> nn.Module:
            return _build(create_fn, _name, _spec, pretrained, kwargs)
        _ENTRIES[name] = (_entrypoint(name, module, entry, f'{spec.seed} (timm name {spec.timm_name}).'),
                          module, spec)

    for name, stock in generic.items():
        def entry(
                pretrained: bool = False,
                pool: str = 'skip',
                strides: Optional[Union[str, int, tuple]] = None,
                prepool: Optional[str] = None,
                prepool_stride: Optional[int] = None,
                _name: str = name,
                _stock: ArchSpec = stock,
                **kwargs: Any,
        ) -> nn.Module:
            if prepool is not None and prepool_stride is None:
                prepool_stride = 4
            spec = ArchSpec(_stock.backbone, pool, _stock.strides if strides is None else strides, _stock.dynamic,
                            prepool, prepool_stride)  # a prepool_stride without a prepool is an error there
            cfg = pooled_cfg(spec)
            overlay = dict(pool_size=cfg['pool_size'], description=cfg['description'])
            overlay.update(kwargs.pop('pretrained_cfg_overlay', None) or {})
            return _build(create_fn, _name, spec, pretrained, dict(kwargs, pretrained_cfg_overlay=overlay))
        _ENTRIES[name] = (_entrypoint(name, module, entry,
                                      f'Generic {stock.backbone}{" (dynamic convs)" if stock.dynamic else ""}: '
                                      f'kwargs pool=, strides=, prepool=, prepool_stride= set the architecture.'),
                          module, stock)
    return cfgs


def create_model(arch: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build any architecture of the grammar, by seed string or timm name (``name.tag`` for pretrained tags).

    Registered names go through ``timm.create_model`` unchanged; any other valid string is built by its
    backbone's generic entrypoint with the architecture as kwargs.
    """
    import timm
    if timm.is_model(arch) or ':' in arch:  # hf-hub:, local-dir: and other timm sources
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    name, dot, tag = arch.partition('.')
    spec = ArchSpec.parse(name)
    if timm.is_model(spec.timm_name):
        return timm.create_model(spec.timm_name + dot + tag, pretrained=pretrained, **kwargs)
    if dot:
        raise ValueError(f"No pretrained tag '{tag}' for '{name}': it is not a registered model name.")
    return timm.create_model(generic_name(spec.backbone, spec.dynamic), pretrained=pretrained,
                             **spec.model_kwargs(), **kwargs)
