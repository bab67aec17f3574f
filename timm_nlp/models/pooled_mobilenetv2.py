"""The paper's MobileNetV2 networks (seed names mobilenet_v2 and mobilenet): timm's ``EfficientNet`` class built as
``mobilenetv2_100``, as timm itself does, reshaped by an ``ArchSpec``.

As the paper's code builds them: a stage digit s > 1 with ``skip`` strides the first block's depthwise conv; with any
other method the first block runs at stride 1 and a pooling layer follows it (mobilenet_v2, timm prefix
``mobilenetv2``) or precedes it (mobilenet, prefix ``mobilenetv2b0``). A pre-pool makes the stem conv stride 1 and
follows the stem's norm-act (``bn1.act`` becomes ``Sequential(act, pool)``, so every stock key is kept). ``dy`` makes
every conv dynamic. The in-block placement (``placement='block'``) puts the pool in the first block's ``aa`` slot.
"""
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List

from torch import nn

from timm.layers import get_act_layer
from timm.models import build_model_with_cfg
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet

from timm_nlp.grammar import ArchSpec
from timm_nlp.layers import convert_dynamic_conv
from ._registry import family_default_cfgs, register_family
from ._surgery import (
    check_output_stride, init_paper_weights, is_pooled, make_prepool, place_stage_pools, pooled_group_matcher,
    resolve_placement, set_stride)
from ._weights import checkpoint_filter_fn

__all__ = ['PooledMobileNetV2', 'feature_stages']

# MobileNetV2 (Sandler et al., 2018) in timm's block-string notation, one list per stage
MOBILENETV2_ARCH = [
    ['ds_r1_k3_s1_c16'], ['ir_r2_k3_s2_e6_c24'], ['ir_r3_k3_s2_e6_c32'], ['ir_r4_k3_s2_e6_c64'],
    ['ir_r3_k3_s1_e6_c96'], ['ir_r3_k3_s2_e6_c160'], ['ir_r1_k3_s1_e6_c320'],
]


def feature_stages(arch: ArchSpec) -> List[int]:
    """The stages whose output is a feature level: every stage followed by a down-sampling stage, and the last."""
    n = len(arch.strides)
    return [i for i in range(n) if i == n - 1 or arch.strides[i + 1] > 1]


def _block_out_chs(blk: nn.Module) -> int:
    """Output channels of a depthwise-separable (last conv ``conv_pw``) or inverted-residual block (``conv_pwl``)."""
    return (blk.conv_pwl if hasattr(blk, 'conv_pwl') else blk.conv_pw).out_channels


class PooledMobileNetV2(EfficientNet):
    """timm EfficientNet (as MobileNetV2) reshaped by an ``ArchSpec`` into the paper's network.

    Args:
        arch: The architecture.
        placement: 'paper' (the backbone's placement in the paper's code) or 'block' (in-block, ceil mode).
        dynamic_kernels: K of the dynamic convolutions (``dy``).
        dynamic_temperature: Their softmax temperature.
        **kwargs: timm EfficientNet arguments (num_classes, in_chans, global_pool, drop_rate, ...).
    """

    def __init__(
            self,
            arch: ArchSpec,
            placement: str = 'paper',
            dynamic_kernels: int = 4,
            dynamic_temperature: float = 34.,
            output_stride: int = 32,
            device=None,
            dtype=None,
            **kwargs: Any,
    ):
        check_output_stride(output_stride)
        super().__init__(decode_arch_def(MOBILENETV2_ARCH), device=device, dtype=dtype, **kwargs)
        dd = {'device': device, 'dtype': dtype}
        self.arch = arch
        self.placement = resolve_placement(placement, arch)
        if arch.prepool is not None:
            set_stride(self.conv_stem, arch.prepool_stride if arch.prepool.method == 'skip' else 1)
        for stage, stride in zip(self.blocks, arch.strides):
            set_stride(stage[0].conv_dw, 1 if is_pooled(arch, stride) else stride)
        if arch.dynamic:
            convert_dynamic_conv(self, num_kernels=dynamic_kernels, temperature=dynamic_temperature)
        pool_kw = dict(dynamic=arch.dynamic, dynamic_kernels=dynamic_kernels, dynamic_temperature=dynamic_temperature,
                       **dd)
        if arch.prepool is not None:
            pool = make_prepool(arch, self.conv_stem.out_channels, **pool_kw)
            self.bn1.act = nn.Sequential(OrderedDict([('act', self.bn1.act), ('pool', pool)]))
        out_chs = [_block_out_chs(stage[0]) for stage in self.blocks]
        in_chs = [self.conv_stem.out_channels] + out_chs[:-1]
        stages = place_stage_pools(arch, self.placement, list(self.blocks), in_chs, out_chs, lambda blk: blk.conv_dw,
                                   dynamic_kernels, dynamic_temperature, **dd)
        self.blocks = nn.Sequential(*stages)
        init_paper_weights(self, 'mobilenetv2')
        self.feature_info = [
            dict(stage=i + 1, reduction=arch.reductions[i + 1], module=f'blocks.{i}', num_chs=out_chs[i])
            for i in feature_stages(arch)]
        self.stage_ends = [f['stage'] for f in self.feature_info]

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        matcher = super().group_matcher(coarse)
        return matcher if coarse else pooled_group_matcher(matcher, r'^blocks\.(\d+)\.pool', self.placement)


def _create(variant: str, arch: ArchSpec, pretrained: bool = False, **kwargs: Any) -> PooledMobileNetV2:
    model_args = dict(
        num_features=1280, stem_size=32, round_chs_fn=partial(round_channels, multiplier=1.0),
        norm_layer=nn.BatchNorm2d, act_layer=get_act_layer('relu6'))
    # features_only: module names kept (as stock EfficientNetFeatures keeps them, so their weights load both ways),
    # all levels by default (a stride pattern such as 1122121 has four, not timm's usual five)
    feature_cfg = dict(feature_cls='hook', no_rewrite=False, out_indices=tuple(range(len(feature_stages(arch)))))
    return build_model_with_cfg(
        PooledMobileNetV2, variant, pretrained, arch=arch, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=feature_cfg, **dict(model_args, **kwargs))


_BACKBONES = ('mobilenet_v2', 'mobilenet')
default_cfgs = family_default_cfgs(_BACKBONES)
register_family(__name__, _BACKBONES, _create)
