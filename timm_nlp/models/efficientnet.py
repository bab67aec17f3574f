"""Pooled MobileNetV2 (seed names ``mobilenet_v2`` and ``mobilenet``): timm's ``EfficientNet`` class built as
``mobilenetv2_100``, as timm itself does, reshaped by an ``ArchSpec``.

The first block of each stage takes the stage's stride: ``skip`` on its depthwise conv, any other method as a
pooling layer in the block's ``aa`` slot (after the depthwise conv and its norm-act). A pre-pool makes the
stem conv stride 1 and follows the stem norm-act: ``bn1`` becomes ``Sequential(bn1, pool)``.
"""
from functools import partial
from typing import Any, List

from torch import nn

from timm.layers import get_act_layer
from timm.models import build_model_with_cfg
from timm.models._efficientnet_builder import decode_arch_def, efficientnet_init_weights, round_channels
from timm.models.efficientnet import EfficientNet

from timm_nlp.grammar import ArchSpec
from timm_nlp.layers import convert_dynamic_conv
from ._pooled import (
    check_output_stride, checkpoint_filter_fn, insert_stage_pools, make_pool, reset_deform_offsets, set_stride)
from ._registry import register_family

__all__ = ['PooledMobileNetV2']

# MobileNetV2 (Sandler et al., 2018) in timm's block-string notation, one list per stage
MOBILENETV2_ARCH = [
    ['ds_r1_k3_s1_c16'], ['ir_r2_k3_s2_e6_c24'], ['ir_r3_k3_s2_e6_c32'], ['ir_r4_k3_s2_e6_c64'],
    ['ir_r3_k3_s1_e6_c96'], ['ir_r3_k3_s2_e6_c160'], ['ir_r1_k3_s1_e6_c320'],
]


def feature_stages(arch: ArchSpec) -> List[int]:
    """The stages whose output is a feature level: every stage followed by a down-sampling stage, and the last."""
    n = len(arch.strides)
    return [i for i in range(n) if i == n - 1 or arch.strides[i + 1] > 1]


class PooledMobileNetV2(EfficientNet):
    """timm EfficientNet (as MobileNetV2) reshaped by an ``ArchSpec``."""

    def __init__(
            self,
            arch: ArchSpec,
            dynamic_kernels: int = 4,
            dynamic_temperature: float = 30.,
            output_stride: int = 32,
            device=None,
            dtype=None,
            **kwargs: Any,
    ):
        check_output_stride(output_stride)
        super().__init__(decode_arch_def(MOBILENETV2_ARCH), device=device, dtype=dtype, **kwargs)
        dd = {'device': device, 'dtype': dtype}
        self.arch = arch
        pooled = arch.pool.method != 'skip'
        if arch.prepool is not None:
            set_stride(self.conv_stem, 1)
        for stage, stride in zip(self.blocks, arch.strides):
            blk = stage[0]
            if blk.has_skip and stride > 1:
                raise ValueError(f'Block {blk.__class__.__name__} has an identity shortcut and cannot take stride '
                                 f'{stride} in {arch.seed}.')
            set_stride(blk.conv_dw, 1 if pooled else stride)
        if arch.dynamic:
            convert_dynamic_conv(self, num_kernels=dynamic_kernels, temperature=dynamic_temperature)
        if arch.prepool is not None:
            pool = make_pool(arch.prepool, self.conv_stem.out_channels, arch.prepool_stride, 1, prepool=True, **dd)
            self.bn1 = nn.Sequential(self.bn1, pool)
        insert_stage_pools(arch, [stage[0] for stage in self.blocks], lambda blk: blk.conv_dw, **dd)
        efficientnet_init_weights(self)
        reset_deform_offsets(self)
        self.feature_info = [
            dict(stage=i + 1, reduction=arch.reductions[i + 1], module=f'blocks.{i}',
                 num_chs=self.blocks[i][-1].feature_info('bottleneck')['num_chs'])
            for i in feature_stages(arch)]
        self.stage_ends = [f['stage'] for f in self.feature_info]


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


default_cfgs = register_family(__name__, ('mobilenet_v2',), _create)
