"""The paper's ResNet-18/50 (seed names resnet18, resnet50, resnet18_v2, resnet50_v2): timm's ``ResNet`` reshaped.

As the paper's code builds them: the stem conv 7x7 stride 2, BN, ReLU and a max-pool of kernel 2, stride 2; a stage
digit s > 1 with ``skip`` strides the first block's 3x3 conv and its shortcut; with any other method the whole stage
runs at stride 1 and a pooling layer follows its last block (resnet18/50) or its first block (the ``_v2``
backbones, timm prefixes ``resnet18b1``/``resnet50b1``). A pre-pool makes the stem conv stride 1 and replaces the
max-pool. ``dy`` makes every conv dynamic. The in-block placement (``placement='block'``) puts the pool in the first
block's ``aa`` slot instead.
"""
from typing import Any, Dict, List, Type, Union

from torch import nn

from timm.models import build_model_with_cfg
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from timm_nlp.grammar import ArchSpec
from timm_nlp.layers import WindowMaxPool2d
from ._registry import family_default_cfgs, register_family
from ._surgery import PooledBackbone, check_output_stride, pooled_group_matcher, set_stride
from ._weights import checkpoint_filter_fn

__all__ = ['PooledResNet']

_UNSUPPORTED = ('avg_down', 'replace_stem_pool', 'aa_layer')


class PooledResNet(PooledBackbone, ResNet):
    """timm ResNet reshaped by an ``ArchSpec`` into the paper's network.

    Args:
        block: timm's BasicBlock or Bottleneck.
        layers: Blocks per stage.
        arch: The architecture.
        placement: 'paper' (the backbone's placement in the paper's code) or 'block' (in-block, ceil mode).
        dynamic_kernels: K of the dynamic convolutions (``dy``).
        dynamic_temperature: Their softmax temperature.
        zero_init_last: timm's zero init of each block's last BN (off, as in the paper's code).
        **kwargs: timm ResNet arguments (num_classes, in_chans, global_pool, drop_rate, stem_type, ...).
    """
    family = 'resnet'

    def __init__(
            self,
            block: Type[Union[BasicBlock, Bottleneck]],
            layers: tuple,
            arch: ArchSpec,
            placement: str = 'paper',
            dynamic_kernels: int = 4,
            dynamic_temperature: float = 34.,
            output_stride: int = 32,
            zero_init_last: bool = False,
            device=None,
            dtype=None,
            **kwargs: Any,
    ):
        check_output_stride(output_stride)
        for name in _UNSUPPORTED:
            if kwargs.get(name):
                raise ValueError(f'{name} is not supported by the pooled ResNets: the architecture string sets the '
                                 'stem pool and every stride (a pooled stage has no strided block).')
        super().__init__(block, layers, zero_init_last=False, device=device, dtype=dtype, **kwargs)
        self.maxpool = WindowMaxPool2d(2)
        self.reshape(arch, placement, dynamic_kernels, dynamic_temperature, device=device, dtype=dtype)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()
        self.feature_info = [dict(self.feature_info[0], reduction=arch.stem_conv_stride)] + [
            dict(f, reduction=r) for f, r in zip(self.feature_info[1:], arch.reductions[1:])]

    def _stem_conv(self) -> nn.Module:
        return self.conv1[0] if isinstance(self.conv1, nn.Sequential) else self.conv1

    def _stem_chs(self) -> int:
        return self.bn1.num_features

    def _stages(self) -> List[nn.Sequential]:
        return [getattr(self, f'layer{i + 1}') for i in range(len(self.arch.strides))]

    def _set_stages(self, stages: List[nn.Sequential]) -> None:
        for i, stage in enumerate(stages):
            setattr(self, f'layer{i + 1}', stage)

    def _place_prepool(self, pool: nn.Module) -> None:
        self.maxpool = pool

    @staticmethod
    def _strided_conv(blk: nn.Module) -> nn.Module:
        return blk.conv1 if isinstance(blk, BasicBlock) else blk.conv2

    @staticmethod
    def _block_out_chs(blk: nn.Module) -> int:
        return (blk.bn2 if isinstance(blk, BasicBlock) else blk.bn3).num_features

    def _restride(self, stage: nn.Sequential, stride: int, pooled: bool, **dd: Any) -> None:
        """The first block with its strided conv at the stage's stride (skip) or at 1, and a 1x1 shortcut projection
        where the shortcut is strided or the channels change; under a pool in-block (the shortcut skips the pool and
        takes its stride) and in the ``_v2`` placement (the paper's code keeps the projection that the nominal stride
        makes, at stride 1) there is always one."""
        blk = stage[0]
        if pooled:
            shortcut_stride, projection = {'block': (stride, True), 'first': (1, True)}.get(self.placement, (1, False))
            stride = 1
        else:
            shortcut_stride, projection = stride, False
        set_stride(self._strided_conv(blk), stride)
        in_chs, out_chs = blk.conv1.in_channels, self._block_out_chs(blk)
        if not (projection or shortcut_stride != 1 or in_chs != out_chs):
            blk.downsample = None
        elif blk.downsample is None:
            blk.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=shortcut_stride, bias=False, **dd), type(blk.bn1)(out_chs, **dd))
        else:
            conv = blk.downsample[0]
            set_stride(conv, shortcut_stride)
            conv.padding = (0, 0)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        matcher = super().group_matcher(coarse)
        return matcher if coarse else pooled_group_matcher(matcher, r'^layer(\d+)\.pool', self.placement)


_MODEL_ARGS = {
    'resnet18': dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    'resnet50': dict(block=Bottleneck, layers=(3, 4, 6, 3)),
}


def _create(variant: str, arch: ArchSpec, pretrained: bool = False, **kwargs: Any) -> PooledResNet:
    return build_model_with_cfg(
        PooledResNet, variant, pretrained, arch=arch, pretrained_filter_fn=checkpoint_filter_fn,
        **dict(_MODEL_ARGS[arch.base_name], **kwargs))


_BACKBONES = ('resnet18', 'resnet50', 'resnet18_v2', 'resnet50_v2')
default_cfgs = family_default_cfgs(_BACKBONES)
register_family(__name__, _BACKBONES, _create)
