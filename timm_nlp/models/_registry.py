"""Registration of the pooled architectures in timm's model registry (timm-form names only).

For every backbone and its ``dy`` variant: the grid of ``GRID_POOLS`` x three stride patterns (stock, first stage at
2, first stage at 4), the architectures of the paper's examples that the grid lacks, and a generic entrypoint
``[dy]{prefix}_pooled`` configured by kwargs (so any architecture reaches timm's ``train.py`` through
``--model-kwargs``). Seed-form strings (``'resnet18-nlp-1222'``) resolve through ``timm_nlp.create_model``.
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

import timm
from timm.models import (
    PretrainedCfg, generate_default_cfgs, get_pretrained_cfg, register_model, resolve_pretrained_cfg)

from timm_nlp.grammar import BACKBONES, ArchSpec
from ._surgery import PAPER_ID
from ._weights import load_stock_source

__all__ = [
    'GRID_POOLS', 'PAPER_EXAMPLES', 'grid_specs', 'generic_name', 'family_default_cfgs', 'register_family',
    'create_model', 'list_pooled_models', 'load_manifest', 'register_pretrained', 'pooled_cfg', 'MANIFEST_PATH',
    'classifier_weight_key',
]

GRID_POOLS = (
    'skip', 'maxp', 'avgp', 'lip', 'gaussian_pool', 'nlp', 'nlp_headfix2', 'nlp_headfix2_nowin', 'nlp_reduced',
    'nlp_headfix2_nowin_reduced', 'dfmnlp', 'mixp', 'dfmixp',
)
# the architecture strings of the paper's code's examples and experiments
PAPER_EXAMPLES = (
    'resnet18-nlp-1222', 'resnet18-nlp_headfix2-2222', 'resnet18-nlp_headfix2-4222',
    'mobilenet_v2-nlp_headfix2-1222121', 'mobilenet_v2-nlp_headfix2-2222121', 'mobilenet_v2-nlp_headfix2-4222121',
    'mobilenet_v2-gaussian_pool-4222121', 'mobilenet-skip-1222121', 'resnet18-nlp_reduced-1222',
    'resnet18-nlp_headfix2_nowin_reduced-1222', 'resnet18-nlp_headfix2_nowin_reduced-2222',
    'dyresnet18-dfmnlp_reduced-1222', 'dyresnet18-skip-1222', 'dymobilenet_v2-nlp_headfix2-1222121',
    'prepool-nlp_headfix2-4-resnet18-skip-1222', 'prepool-nlp_headfix2-4-resnet18-nlp_headfix2-1222',
    'prepool-maxp-4-resnet50-skip-1222', 'prepool-lip-8-resnet18-skip-1222',
)
PAPER_NAME = 'Self-Attentive Pooling for Efficient Deep Learning'

_ENTRIES: Dict[str, Tuple[Callable[..., nn.Module], str, ArchSpec]] = {}  # name -> (entrypoint, module, spec)
_RUNTIME_MANIFEST: List[Dict[str, Any]] = []

MANIFEST_PATH = Path(__file__).parent / 'pretrained.json'
_MANIFEST_REQUIRED = ('model', 'tag', 'hf_hub_id')
_CFG_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}


def pooled_cfg(arch: ArchSpec, **kwargs: Any) -> Dict[str, Any]:
    """A full pretrained cfg for ``arch``: the paper's evaluation preprocessing (resize and center crop of the
    whole image, bilinear) with the base model's mean and std, the pool size at the cfg's input size (224 unless
    ``input_size`` is given); ``kwargs`` override any field."""
    base = get_pretrained_cfg(arch.base_name)
    input_size = tuple(kwargs.get('input_size', (3, 224, 224)))
    cfg = dict(
        url='', num_classes=1000, input_size=input_size, pool_size=tuple(map(arch.output_size, input_size[1:])),
        crop_pct=1.0, interpolation='bilinear', mean=base.mean, std=base.std, first_conv=base.first_conv,
        classifier=base.classifier, license='apache-2.0', paper_ids=PAPER_ID, paper_name=PAPER_NAME,
        description=f'{arch.seed}: the network of the Self-Attentive Pooling paper\'s code for this string '
                    f'(timm {arch.base_name} reshaped)',
    )
    cfg.update(kwargs)
    return cfg


def classifier_weight_key(arch: ArchSpec) -> str:
    """The state-dict key of the classifier's weight of ``arch``'s models (its base model's ``classifier``, which
    the paper's checkpoints share)."""
    return get_pretrained_cfg(arch.base_name).classifier + '.weight'


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


def _default_tag(base: str) -> str:
    tags = timm.list_pretrained(base + '.*')
    return tags[0] if tags else base


def _build(create_fn: Callable[..., nn.Module], name: str, spec: ArchSpec, pretrained: bool,
           kwargs: Dict[str, Any]) -> nn.Module:
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


def _named_entry(create_fn: Callable[..., nn.Module], name: str, spec: ArchSpec) -> Callable[..., nn.Module]:
    """The entrypoint of a named architecture: ``(pretrained=False, **kwargs)``, as timm's own."""
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return _build(create_fn, name, spec, pretrained, kwargs)
    return entry


def _generic_entry(create_fn: Callable[..., nn.Module], name: str, stock: ArchSpec) -> Callable[..., nn.Module]:
    """The entrypoint of a backbone's generic name, its architecture set by keyword arguments."""
    def entry(
            pretrained: bool = False,
            pool: str = 'skip',
            strides: Optional[Union[str, int, tuple]] = None,
            prepool: Optional[str] = None,
            prepool_stride: Optional[int] = None,
            **kwargs: Any,
    ) -> nn.Module:
        if prepool is not None and prepool_stride is None:
            prepool_stride = 4
        spec = ArchSpec(stock.backbone, pool, stock.strides if strides is None else strides, stock.dynamic,
                        prepool, prepool_stride)  # a prepool_stride without a prepool is an error there
        cfg = pooled_cfg(spec)
        overlay = dict(pool_size=cfg['pool_size'], description=cfg['description'])
        overlay.update(kwargs.pop('pretrained_cfg_overlay', None) or {})
        return _build(create_fn, name, spec, pretrained, dict(kwargs, pretrained_cfg_overlay=overlay))
    return entry


def _register(name: str, module: str, fn: Callable[..., nn.Module], doc: str, spec: ArchSpec) -> None:
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = module
    fn.__doc__ = doc
    _ENTRIES[name] = (register_model(fn), module, spec)


def grid_specs(backbone: str, dynamic: bool) -> List[ArchSpec]:
    """The registered grid of one backbone: every grid pool x (stock, first stage 2, first stage 4)."""
    stock = BACKBONES[backbone].stock_strides
    return [ArchSpec(backbone, pool, first + stock[1:], dynamic) for pool in GRID_POOLS for first in '124']


def generic_name(backbone: str, dynamic: bool) -> str:
    return f"{'dy' if dynamic else ''}{BACKBONES[backbone].prefix}_pooled"


def _family_specs(backbones: Iterable[str]) -> Tuple[Dict[str, ArchSpec], Dict[str, ArchSpec]]:
    """The named architectures (grid and paper examples) and the generic entrypoints' stock architectures."""
    backbones = tuple(backbones)
    named: Dict[str, ArchSpec] = {}
    generic: Dict[str, ArchSpec] = {}
    for backbone in backbones:
        for dynamic in (False, True):
            for spec in grid_specs(backbone, dynamic):
                named[spec.timm_name] = spec
            generic[generic_name(backbone, dynamic)] = ArchSpec(
                backbone, 'skip', BACKBONES[backbone].stock_strides, dynamic)
    for seed in PAPER_EXAMPLES:
        spec = ArchSpec.from_seed(seed)
        if spec.backbone in backbones:
            named.setdefault(spec.timm_name, spec)
    return named, generic


def family_default_cfgs(backbones: Iterable[str]) -> Dict[str, Any]:
    """The default cfgs of a family module's architectures (its ``default_cfgs``)."""
    named, generic = _family_specs(backbones)
    manifest = load_manifest()
    return generate_default_cfgs({k: v for name, spec in {**named, **generic}.items()
                                  for k, v in _cfgs_for(name, spec, manifest).items()})


def register_family(module: str, backbones: Iterable[str], create_fn: Callable[..., nn.Module]) -> None:
    """Register every architecture of ``backbones`` with entrypoints in ``module`` (a family module, whose
    ``default_cfgs`` is ``family_default_cfgs(backbones)``).

    Args:
        module: ``__name__`` of the family module; its last component becomes timm's module name.
        backbones: Seed backbone names built by this family.
        create_fn: ``create_fn(variant, arch, pretrained=False, **kwargs)`` building the model.
    """
    named, generic = _family_specs(backbones)
    for name, spec in named.items():
        doc = f'{spec.seed} (timm name {spec.timm_name}).'
        _register(name, module, _named_entry(create_fn, name, spec), doc, spec)
    for name, stock in generic.items():
        doc = (f'Generic {stock.backbone}{" (dynamic convs)" if stock.dynamic else ""}: kwargs pool=, strides=, '
               'prepool=, prepool_stride= set the architecture.')
        _register(name, module, _generic_entry(create_fn, name, stock), doc, stock)


def list_pooled_models(pattern: str = '*') -> List[str]:
    """Registered names of timm-nlp (grid, paper examples and generic entrypoints) matching a glob pattern."""
    return sorted(n for n in _ENTRIES if fnmatch.fnmatchcase(n, pattern.lower()))


def create_model(arch: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build any architecture of the grammar, by seed string or timm name (``name.tag`` for pretrained tags).

    Registered names go through ``timm.create_model`` unchanged; any other valid string is built by its
    backbone's generic entrypoint with the architecture as kwargs.

    Args:
        arch: A timm name (``resnet18_nlp_headfix2_1222``), a seed string of the paper's code
            (``prepool-nlp_headfix2-4-resnet18-skip-1222``, any case), a stock timm name or an ``hf-hub:`` source.
        pretrained: Load published weights (``name.tag``; see ``timm_nlp.load_manifest``).
        **kwargs: timm ``create_model`` arguments (num_classes, in_chans, features_only, ...) and the model options
            placement ('paper' or 'block'), dynamic_kernels, dynamic_temperature, stock_weights.
    """
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
