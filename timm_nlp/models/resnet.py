"""Pooled ResNet-18/50: timm's ``ResNet`` with per-stage strides, pooling in the down-sampling blocks (the
blocks' ``aa`` seam), a stem pre-pool (the ``maxpool`` slot) and optional dynamic convolutions."""
from typing import Any, Type, Union

from torch import nn

from timm.models import build_model_with_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet, downsample_conv

from timm_nlp.grammar import ArchSpec
from timm_nlp.layers import convert_dynamic_conv
from ._pooled import (
    check_output_stride, checkpoint_filter_fn, insert_stage_pools, make_pool, reset_deform_offsets,
    resnet_feature_info, set_stride)
from ._registry import register_family

__all__ = ['PooledResNet']


class PooledResNet(ResNet):
    """timm ResNet reshaped by an ``ArchSpec``.

    The first block of each stage takes the stage's stride: ``skip`` on its strided 3x3 conv, any other method
    as a pooling layer in the block's ``aa`` slot after a stride-1 conv. The shortcut's 1x1 conv takes the same
    stride (a new projection where the stock block had none). With a pre-pool, the 7x7 stem conv has stride 1
    and the pre-pool replaces the stem max-pool.
    """

    def __init__(
            self,
            block: Type[Union[BasicBlock, Bottleneck]],
            layers: tuple,
            arch: ArchSpec,
            dynamic_kernels: int = 4,
            dynamic_temperature: float = 30.,
            output_stride: int = 32,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
            **kwargs: Any,
    ):
        check_output_stride(output_stride)
        if kwargs.get('avg_down'):
            raise ValueError('avg_down=True is not supported by pooled ResNets: the stage strides go to the shortcut '
                             "1x1 conv, which avg_down's shortcut does not stride.")
        super().__init__(block, layers, zero_init_last=zero_init_last, device=device, dtype=dtype, **kwargs)
        dd = {'device': device, 'dtype': dtype}
        self.arch = arch
        pooled = arch.pool.method != 'skip'
        # a deep stem (stem_type='deep'/'deep_tiered') is a Sequential whose first conv is the strided one
        stem_conv = self.conv1[0] if isinstance(self.conv1, nn.Sequential) else self.conv1
        if arch.prepool is not None:
            set_stride(stem_conv, 1)
        stages = [getattr(self, f'layer{i + 1}') for i in range(len(arch.strides))]
        for stage, stride in zip(stages, arch.strides):
            blk = stage[0]
            set_stride(self._strided_conv(blk), 1 if pooled else stride)
            if blk.downsample is None and stride > 1:
                out_chs = (blk.bn2 if isinstance(blk, BasicBlock) else blk.bn3).num_features
                blk.downsample = downsample_conv(blk.conv1.in_channels, out_chs, 1, norm_layer=type(blk.bn1), **dd)
            if blk.downsample is not None:
                set_stride(blk.downsample[0], stride)
        if arch.dynamic:
            convert_dynamic_conv(self, num_kernels=dynamic_kernels, temperature=dynamic_temperature)
        if arch.prepool is not None:
            self.maxpool = make_pool(arch.prepool, self.bn1.num_features, arch.prepool_stride, 1, prepool=True, **dd)
        insert_stage_pools(arch, [stage[0] for stage in stages], self._strided_conv, **dd)
        self.init_weights(zero_init_last=zero_init_last)
        reset_deform_offsets(self)
        self.feature_info = resnet_feature_info(self.feature_info, arch)

    @staticmethod
    def _strided_conv(blk: nn.Module) -> nn.Module:
        return blk.conv1 if isinstance(blk, BasicBlock) else blk.conv2


_MODEL_ARGS = {
    'resnet18': dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    'resnet50': dict(block=Bottleneck, layers=(3, 4, 6, 3)),
}


def _create(variant: str, arch: ArchSpec, pretrained: bool = False, **kwargs: Any) -> PooledResNet:
    return build_model_with_cfg(
        PooledResNet, variant, pretrained, arch=arch, pretrained_filter_fn=checkpoint_filter_fn,
        **dict(_MODEL_ARGS[arch.backbone], **kwargs))


default_cfgs = register_family(__name__, ('resnet18', 'resnet50'), _create)
