"""Pooled pre-activation ResNet-18/50: timm's ``ResNetV2`` reshaped like ``PooledResNet``.

timm's pre-activation blocks have no ``aa`` seam; the blocks below add one, after the norm-act that follows
the (now stride-1) strided conv, the place ``aa`` has in the post-activation blocks.
"""
from typing import Any, Callable, Tuple

import torch
from torch import nn

from timm.layers import BatchNormAct2d, calculate_drop_path_rates, create_conv2d, get_act_layer, get_norm_act_layer
from timm.models import build_model_with_cfg
from timm.models.resnetv2 import DownsampleConv, PreActBasic, PreActBottleneck, ResNetV2

from timm_nlp.grammar import ArchSpec
from timm_nlp.layers import convert_dynamic_conv
from ._pooled import (
    check_output_stride, checkpoint_filter_fn, insert_stage_pools, make_pool, reset_deform_offsets,
    resnet_feature_info, set_stride)
from ._registry import register_family

__all__ = ['PooledResNetV2', 'PreActBasicPool', 'PreActBottleneckPool']


class _PoolSeam:
    """The common pre-activation and shortcut of the pre-activation blocks with an ``aa`` seam below."""

    def _preact(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        return x_preact, shortcut


class PreActBasicPool(_PoolSeam, PreActBasic):
    """``PreActBasic`` with a down-sampling layer ``aa`` between ``norm2`` and ``conv2``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.aa = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact, shortcut = self._preact(x)
        x = self.conv2(self.aa(self.norm2(self.conv1(x_preact))))
        return self.drop_path(x) + shortcut


class PreActBottleneckPool(_PoolSeam, PreActBottleneck):
    """``PreActBottleneck`` with a down-sampling layer ``aa`` between ``norm3`` and ``conv3``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.aa = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact, shortcut = self._preact(x)
        x = self.conv2(self.norm2(self.conv1(x_preact)))
        x = self.conv3(self.aa(self.norm3(x)))
        return self.drop_path(x) + shortcut


class PooledResNetV2(ResNetV2):
    """timm ResNetV2 reshaped by an ``ArchSpec`` (see ``PooledResNet``; the pre-pool replaces ``stem.pool``)."""

    def __init__(
            self,
            layers: Tuple[int, ...],
            arch: ArchSpec,
            basic: bool = False,
            bottle_ratio: float = 0.25,
            act_layer: Callable = nn.ReLU,
            norm_layer: Callable = BatchNormAct2d,
            conv_layer: Callable = create_conv2d,
            drop_path_rate: float = 0.,
            dynamic_kernels: int = 4,
            dynamic_temperature: float = 30.,
            output_stride: int = 32,
            zero_init_last: bool = False,
            device=None,
            dtype=None,
            **kwargs: Any,
    ):
        check_output_stride(output_stride)
        if kwargs.get('avg_down'):
            raise ValueError('avg_down=True is not supported by pooled ResNetV2s: the stage strides go to the shortcut '
                             "1x1 conv, which avg_down's shortcut does not stride.")
        stem_type = kwargs.get('stem_type', '')
        if arch.prepool is not None and ('fixed' in stem_type or 'same' in stem_type):
            raise ValueError(f"stem_type='{stem_type}' cannot take a pre-pool: the pre-pool replaces the stem pool, "
                             "whose padding scheme this stem type fixes. Use '', 'deep' or 'tiered'.")
        super().__init__(
            layers, basic=basic, bottle_ratio=bottle_ratio, act_layer=act_layer, norm_layer=norm_layer,
            conv_layer=conv_layer, drop_path_rate=drop_path_rate, zero_init_last=zero_init_last,
            device=device, dtype=dtype, **kwargs)
        dd = {'device': device, 'dtype': dtype}
        self.arch = arch
        pooled = arch.pool.method != 'skip'
        norm_act = get_norm_act_layer(norm_layer, act_layer=get_act_layer(act_layer))
        block_dprs = calculate_drop_path_rates(drop_path_rate, layers, stagewise=True)
        block_cls = PreActBasicPool if basic else PreActBottleneckPool
        # a deep stem (stem_type='deep'/'tiered') has three convs, the first of them strided
        deep_stem = hasattr(self.stem, 'conv1')
        if arch.prepool is not None:
            set_stride(self.stem.conv1 if deep_stem else self.stem.conv, 1)
        for stage, stride, dprs in zip(self.stages, arch.strides, block_dprs):
            blk = stage.blocks[0]
            in_chs, out_chs = blk.norm1.num_features, self._last_conv(blk).out_channels
            if pooled and stride > 1:
                # built as a stride-2 block (stock paddings, a projection shortcut), re-strided below
                blk = stage.blocks[0] = block_cls(
                    in_chs, out_chs, bottle_ratio=bottle_ratio, stride=2, conv_layer=conv_layer, norm_layer=norm_act,
                    proj_layer=DownsampleConv, drop_path_rate=dprs[0], **dd)
            set_stride(self._strided_conv(blk), 1 if pooled else stride)
            if blk.downsample is None and stride > 1:
                blk.downsample = DownsampleConv(
                    in_chs, out_chs, stride=2, preact=True, conv_layer=conv_layer, norm_layer=norm_act, **dd)
            if blk.downsample is not None:
                set_stride(blk.downsample.conv, stride)
        if arch.dynamic:
            # the backbone only: the classifier (head.fc) is a 1x1 conv too
            for part in (self.stem, self.stages):
                convert_dynamic_conv(part, num_kernels=dynamic_kernels, temperature=dynamic_temperature)
        if arch.prepool is not None:
            stem_chs = (self.stem.conv3 if deep_stem else self.stem.conv).out_channels
            self.stem.pool = make_pool(arch.prepool, stem_chs, arch.prepool_stride, 1, prepool=True, **dd)
        insert_stage_pools(arch, [stage.blocks[0] for stage in self.stages], self._strided_conv, **dd)
        self.init_weights(zero_init_last=zero_init_last)
        reset_deform_offsets(self)
        self.feature_info = resnet_feature_info(self.feature_info, arch)

    @staticmethod
    def _strided_conv(blk: nn.Module) -> nn.Module:
        return blk.conv1 if isinstance(blk, PreActBasic) else blk.conv2

    @staticmethod
    def _last_conv(blk: nn.Module) -> nn.Module:
        return blk.conv2 if isinstance(blk, PreActBasic) else blk.conv3


_MODEL_ARGS = {
    'resnet18_v2': dict(layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), basic=True, bottle_ratio=1.0),
    'resnet50_v2': dict(layers=(3, 4, 6, 3)),
}


def _create(variant: str, arch: ArchSpec, pretrained: bool = False, **kwargs: Any) -> PooledResNetV2:
    return build_model_with_cfg(
        PooledResNetV2, variant, pretrained, arch=arch, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True), **dict(_MODEL_ARGS[arch.backbone], **kwargs))


default_cfgs = register_family(__name__, ('resnet18_v2', 'resnet50_v2'), _create)
