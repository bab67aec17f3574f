"""Checkpoints of the paper's code (``ann.py``) as state dicts of the timm-nlp models.

The paper's ``Network`` keeps its backbone under ``net.`` (and ``module.`` under DataParallel); its module names
follow torchvision's ResNet and a MobileNetV2 of ``features.I.J.conv.K``. Dynamic convs store the K kernels as
``(K, out, in, k, k)`` and their attention as 1x1 convs; deformable offsets are ordered (all rows, all columns) where
torchvision interleaves (row, column) per kernel position.
"""
import logging
import re
from dataclasses import replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from timm_nlp.grammar import ArchSpec, PoolSpec
from timm_nlp.layers import DeformConv2d, DynamicConv2d
from ._registry import classifier_weight_key, create_model
from ._surgery import is_pooled

__all__ = ['convert_paper_state_dict', 'PaperCheckpointError']

_logger = logging.getLogger(__name__)

_RESNET_STEM = {'conv1.': 'conv1.', 'bn1.': 'bn1.', 'fc.': 'fc.'}
_MOBILENET_STEM = {'conv1.0.': 'conv_stem.', 'conv1.1.': 'bn1.', 'conv2.0.': 'conv_head.', 'conv2.1.': 'bn2.',
                   'classifier.': 'classifier.'}
# features.I.J.conv.K: the depthwise-separable first stage, the inverted residuals after it
_DS_LAYERS = {'0': 'conv_dw', '1': 'bn1', '3': 'conv_pw', '4': 'bn2'}
_IR_LAYERS = {'0': 'conv_pw', '1': 'bn1', '3': 'conv_dw', '4': 'bn2', '6': 'conv_pwl', '7': 'bn3'}
# inside a pooling layer (the paper's Pool2d keeps the importance under logit.pool_weight)
_POOL_LAYERS = (
    ('logit.pool_weight.logit.0.', 'local.conv.'), ('logit.pool_weight.logit.1.', 'local.norm.'),
    ('logit.pool_weight.local.0.', 'local.conv.'), ('logit.pool_weight.local.1.', 'local.norm.'),
    ('logit.pool_weight.offset_conv.offset_conv.', 'non_local.patch_embed.offset.'),
    ('logit.pool_weight.downsample.0.m_conv.', 'non_local.patch_embed.mask.'),
    ('logit.pool_weight.downsample.0.conv.', 'non_local.patch_embed.conv.'),
    ('logit.pool_weight.downsample.0.', 'non_local.patch_embed.'),
    ('logit.pool_weight.downsample.1.', 'non_local.norm.'),
    ('logit.pool_weight.multihead_attn.in_proj_weight', 'non_local.attn.qkv.weight'),
    ('logit.pool_weight.multihead_attn.in_proj_bias', 'non_local.attn.qkv.bias'),
    ('logit.pool_weight.multihead_attn.out_proj.', 'non_local.attn.proj.'),
    ('logit.pool_weight.restore.0.', 'non_local.restore.'), ('logit.pool_weight.restore.1.', 'non_local.restore_norm.'),
    ('logit.pool_weight.pos_embed.', 'non_local.pos_embed.'),
    ('ToHidden.1.', 'hidden.conv.'), ('ToHidden.2.', 'hidden.bn.'), ('ToMean.0.', 'mu.conv.'),
    ('ToMean.1.', 'mu.bn.'), ('ToSigma.0.', 'sigma.conv.'), ('ToSigma.1.', 'sigma.bn.'),
)


class PaperCheckpointError(ValueError):
    """A checkpoint that does not convert to the given architecture."""


def _pool_key(rest: str) -> str:
    for src, dst in _POOL_LAYERS:
        if rest.startswith(src):
            return dst + rest[len(src):]
    return rest


def _resnet_key(key: str, spec: ArchSpec) -> str:
    for src, dst in _RESNET_STEM.items():
        if key.startswith(src):
            return dst + key[len(src):]
    if key.startswith('pool.'):
        return 'maxpool.' + _pool_key(key[len('pool.'):])
    m = re.match(r'(layer\d+)\.(?:pool|0\.pooling)\.(.*)', key)
    if m:
        return f'{m.group(1)}.pool.{_pool_key(m.group(2))}'
    return key


def _mobilenet_key(key: str, spec: ArchSpec) -> str:
    for src, dst in _MOBILENET_STEM.items():
        if key.startswith(src):
            return dst + key[len(src):]
    if key.startswith('conv1_pool.'):
        return 'bn1.act.pool.' + _pool_key(key[len('conv1_pool.'):])
    m = re.match(r'features\.(\d+)\.(\d+)\.(.*)', key)
    if not m:
        return key
    stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    if rest.startswith('pooling.'):
        return f'blocks.{stage}.pool.{_pool_key(rest[len("pooling."):])}'
    if spec.spec.placement == 'before' and is_pooled(spec, spec.strides[stage]):
        # the pool is the stage's first module, the blocks follow it
        if block == 0:
            return f'blocks.{stage}.pool.{_pool_key(rest)}'
        block -= 1
    layer = re.match(r'conv\.(\d+)\.(.*)', rest)
    if not layer:
        return f'blocks.{stage}.{block}.{rest}'
    names = _DS_LAYERS if stage == 0 else _IR_LAYERS
    return f'blocks.{stage}.{block}.{names.get(layer.group(1), "conv." + layer.group(1))}.{layer.group(2)}'


def _offset_order(channels: int) -> torch.Tensor:
    """Paper offsets (all rows, then all columns) -> torchvision's (row, column) of each kernel position."""
    n = channels // 2
    return torch.stack((torch.arange(n), torch.arange(n) + n), 1).flatten()


def _transform(key: str, value: torch.Tensor, dynamic: Set[str], offsets: Set[str]) -> Tuple[str, torch.Tensor]:
    """Key and tensor in our layout, for a key already renamed to our module names."""
    m = re.match(r'(.*)\.attention\.(fc[12])\.(weight|bias)$', key)
    if m and m.group(1) in dynamic:  # a dynamic conv's attention: 1x1 convs there, linear layers here
        return f'{m.group(1)}.{m.group(2)}.{m.group(3)}', value.flatten(1) if m.group(3) == 'weight' else value
    parent, _, leaf = key.rpartition('.')
    if parent in offsets and leaf in ('weight', 'bias'):
        dim = 1 if parent in dynamic else 0
        value = value.index_select(dim, _offset_order(value.shape[dim]))
    if parent in dynamic and leaf == 'weight':
        value = value.flatten(0, 1)
    return key, value


def _strip(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], Mapping):
        state_dict = state_dict['state_dict']
    out = {}
    for k, v in state_dict.items():
        for prefix in ('module.', 'net.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def convert_paper_state_dict(
        checkpoint: Mapping[str, Any],
        arch: str,
        model: Optional[nn.Module] = None,
) -> Dict[str, torch.Tensor]:
    """A checkpoint of the paper's code as a state dict of ``timm_nlp.create_model(arch)``.

    Args:
        checkpoint: What the paper's ``ann.py`` saves (a dict with ``state_dict``, keys prefixed ``module.net.``) or a
            bare state dict (prefixes ``module.`` and ``net.`` optional).
        arch: The architecture string it was trained as (seed or timm form).
        model: The target model, if built already (else one is built on the meta device).

    Returns:
        A state dict that loads with ``strict=True`` into the model of ``arch`` with the checkpoint's class count,
        and gives the paper model's outputs (dfmnlp/dfmixp excepted where the paper's sampler differs; a warning
        says so).

    Raises:
        PaperCheckpointError: The checkpoint is of another architecture (the mismatching tensors are named), or is
            a paper ``mixp`` checkpoint, which is the paper code's dfmixp network.
    """
    spec = ArchSpec.parse(arch)
    state_dict = _strip(checkpoint)
    deformable = [k for k in state_dict if 'offset_conv.' in k]
    prepool_prefix = 'pool.' if spec.spec.family == 'resnet' else 'conv1_pool.'
    pre = spec.prepool is not None and spec.prepool.method == 'mixp' and any(
        k.startswith(prepool_prefix) for k in deformable)
    stages = spec.pool.method == 'mixp' and any(not k.startswith(prepool_prefix) for k in deformable)
    if pre or stages:
        def dfm(pool: PoolSpec, deform: bool) -> PoolSpec:
            return PoolSpec('dfmixp', pool.modifiers) if deform else pool
        as_dfmixp = replace(spec, pool=dfm(spec.pool, stages), prepool=dfm(spec.prepool, pre) if pre else spec.prepool)
        raise PaperCheckpointError(
            f"This checkpoint has deformable offsets ({deformable[0]}): the paper code's 'mixp' builds its dfmixp "
            f"network (a deformable embedding), while {spec.seed} is not deformable there. Convert it as "
            f"'{as_dfmixp.seed}'.")
    if model is None:
        head = classifier_weight_key(spec)
        num_classes = state_dict[head].shape[0] if head in state_dict else 1000
        model = create_model(spec.timm_name, num_classes=num_classes, device='meta')
    to_key: Callable[[str, ArchSpec], str] = _resnet_key if spec.spec.family == 'resnet' else _mobilenet_key
    offsets = {f'{name}.offset' for name, m in model.named_modules() if isinstance(m, DeformConv2d)}
    dynamic = {name for name, m in model.named_modules() if isinstance(m, DynamicConv2d)}
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    for key, value in state_dict.items():
        new_key, new_value = _transform(to_key(key, spec), value, dynamic, offsets)
        if new_key not in target:
            unexpected.append(key)
            continue
        out[new_key] = new_value
    for name in dynamic:  # the paper's temperature is a constant, 34
        out.setdefault(f'{name}.temperature', torch.full((), 34.))
    mismatched = [f'{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}' for k, v in out.items()
                  if v.shape != target[k].shape]
    missing = [k for k in target if k not in out]
    if unexpected or mismatched or missing:
        shown = [f'unexpected {k}' for k in unexpected[:6]] + mismatched[:6] + [f'missing {k}' for k in missing[:6]]
        raise PaperCheckpointError(
            f'The checkpoint does not match {spec.seed}: {len(unexpected)} unexpected, {len(mismatched)} mismatched, '
            f'{len(missing)} missing tensors: ' + ', '.join(shown))
    if deformable:
        _logger.warning(f"{spec.seed}: the paper code's deformable sampler starts its grid at 1 and doubles clamped "
                        'edge weights; timm-nlp samples the regular grid (torchvision). Outputs differ from the paper '
                        "code's where its sampler errs (always at the map's last row and column).")
    return out
