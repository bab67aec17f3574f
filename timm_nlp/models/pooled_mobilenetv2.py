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
from ._registry import family_default_cfgs, register_family
from ._surgery import PooledBackbone, check_output_stride, pooled_group_matcher, set_stride
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


class PooledMobileNetV2(PooledBackbone, EfficientNet):
    """timm EfficientNet (as MobileNetV2) reshaped by an ``ArchSpec`` into the paper's network.

    Args:
        arch: The architecture.
        placement: 'paper' (the backbone's placement in the paper's code) or 'block' (in-block, ceil mode).
        dynamic_kernels: K of the dynamic convolutions (``dy``).
        dynamic_temperature: Their softmax temperature.
        **kwargs: timm EfficientNet arguments (num_classes, in_chans, global_pool, drop_rate, ...).
    """
    family = 'mobilenetv2'

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
        out_chs = self.reshape(arch, placement, dynamic_kernels, dynamic_temperature, device=device, dtype=dtype)
        self.feature_info = [
            dict(stage=i + 1, reduction=arch.reductions[i + 1], module=f'blocks.{i}', num_chs=out_chs[i])
            for i in feature_stages(arch)]
        self.stage_ends = [f['stage'] for f in self.feature_info]

    def _stem_conv(self) -> nn.Module:
        return self.conv_stem

    def _stem_chs(self) -> int:
        return self.conv_stem.out_channels

    def _stages(self) -> List[nn.Sequential]:
        return list(self.blocks)

    def _set_stages(self, stages: List[nn.Sequential]) -> None:
        self.blocks = nn.Sequential(*stages)

    def _place_prepool(self, pool: nn.Module) -> None:
        """After the stem's norm-act: ``bn1.act`` becomes ``Sequential(act, pool)``, every stock key kept."""
        self.bn1.act = nn.Sequential(OrderedDict([('act', self.bn1.act), ('pool', pool)]))

    @staticmethod
    def _strided_conv(blk: nn.Module) -> nn.Module:
        return blk.conv_dw

    @staticmethod
    def _block_out_chs(blk: nn.Module) -> int:
        """Output channels of a depthwise-separable (last conv ``conv_pw``) or inverted-residual block
        (``conv_pwl``)."""
        return (blk.conv_pwl if hasattr(blk, 'conv_pwl') else blk.conv_pw).out_channels

    def _restride(self, stage: nn.Sequential, stride: int, pooled: bool, **dd: Any) -> None:
        set_stride(stage[0].conv_dw, 1 if pooled else stride)

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
