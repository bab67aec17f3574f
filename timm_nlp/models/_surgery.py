"""Model surgery shared by the pooled families: a stock timm model reshaped into the paper's network.

One path (``PooledBackbone.reshape``), each family supplying how its stem, stages and blocks look: the stem conv's
stride under a pre-pool, restride the first block of every stage (the stage digit on its strided conv for ``skip``,
stride 1 under a pooling layer), make the backbone's convolutions dynamic (``dy``), the stem pre-pool, the pooling
layers as named children of the stages (``nn.Sequential`` stages keep every stock key), and the paper code's weight
init.
"""
import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from timm.layers import Attention

from timm_nlp.grammar import ArchSpec, PoolSpec
from timm_nlp.layers import (
    DeformConv2d, DynamicConv2d, LearnedPosEmbed2d, convert_dynamic_conv, create_pool2d, prepool_args,
    stage_pool_args)

__all__ = [
    'PLACEMENTS', 'resolve_placement', 'is_pooled', 'set_stride', 'make_stage_pool', 'make_prepool',
    'place_stage_pools', 'init_paper_weights', 'check_output_stride', 'pooled_group_matcher', 'PAPER_ID',
    'PooledBackbone',
]

PAPER_ID = 'arXiv:2209.07659'
# 'paper': the placement of the backbone in the paper's code (end, first or before); 'block': in the first block's
# ``aa`` slot after its strided conv's norm-act, in ceil mode (not a network of the paper)
PLACEMENTS = ('paper', 'block')


def resolve_placement(placement: str, arch: ArchSpec) -> str:
    """``placement`` ('paper' or 'block') as the concrete place: end, first, before or block."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r} is not one of {', '.join(map(repr, PLACEMENTS))}: 'paper' puts a "
                         "stage's pooling layer where the paper's code does, 'block' in its first block's aa slot.")
    return arch.spec.placement if placement == 'paper' else 'block'


def is_pooled(arch: ArchSpec, stride: int) -> bool:
    """Whether a stage of this stride gets a pooling layer (else its first block takes the stride)."""
    return stride > 1 and arch.pool.method != 'skip'


def set_stride(conv: nn.Module, stride: int) -> None:
    """Change a convolution's stride in place; its padding is kept (3x3 pad 1 gives ``ceil(H / s)``)."""
    conv.stride = (stride, stride)


def check_output_stride(output_stride: int) -> None:
    if output_stride != 32:
        raise ValueError(f'Pooled backbones set their strides from the architecture string; output_stride='
                         f'{output_stride} (dilation) is not supported, only 32.')


def make_stage_pool(arch: ArchSpec, stage: int, channels: int, ceil_mode: bool = False, **kwargs: Any) -> nn.Module:
    """The pooling layer of stage ``stage`` (0-based), with the paper code's non-local defaults of that stage."""
    pool = arch.pool
    args = stage_pool_args(pool, arch.spec.family, stage) if pool.is_nonlocal else {}
    return create_pool2d(str(pool), channels, arch.strides[stage], ceil_mode=ceil_mode, **args, **kwargs)


def make_prepool(arch: ArchSpec, channels: int, **kwargs: Any) -> nn.Module:
    """The stem pre-pool (``prepool-skip-S-`` has none: its stem conv takes the stride); always window-normalised,
    as in the paper's code."""
    pool: Optional[PoolSpec] = arch.prepool
    assert pool is not None and arch.prepool_stride is not None
    if pool.method == 'skip':
        return nn.Identity()
    args = prepool_args(pool, arch.prepool_stride) if pool.is_nonlocal else {}
    # the paper's code normalises a pre-pool's windows whatever its modifiers say (nowin is a stage modifier)
    name = str(PoolSpec(pool.method, tuple(m for m in pool.modifiers if m != 'nowin')))
    return create_pool2d(name, channels, arch.prepool_stride, **args, **kwargs)


def _with_pool(stage: nn.Sequential, index: int, pool: nn.Module) -> nn.Sequential:
    children = list(stage.named_children())
    return nn.Sequential(OrderedDict(children[:index] + [('pool', pool)] + children[index:]))


def place_stage_pools(
        arch: ArchSpec,
        placement: str,
        stages: Sequence[nn.Sequential],
        stage_in_chs: Sequence[int],
        stage_out_chs: Sequence[int],
        strided_conv: Callable[[nn.Module], nn.Module],
        **kwargs: Any,
) -> List[nn.Sequential]:
    """The stages with their pooling layers: a child 'pool' after the last block (end), after the first (first),
    before the first (before), or the first block's ``aa`` slot (block; the pooled map is then the strided conv's).
    ``kwargs`` go to every pool (``create_pool2d``: dynamic convs, device, dtype).

    Returns:
        The stages, new ``nn.Sequential`` objects where a pool was inserted (every stock child keeps its name).
    """
    out = []
    for i, stage in enumerate(stages):
        if not is_pooled(arch, arch.strides[i]):
            out.append(stage)
            continue
        if placement == 'block':
            blk = stage[0]
            blk.aa = make_stage_pool(arch, i, strided_conv(blk).out_channels, ceil_mode=True, **kwargs)
            out.append(stage)
            continue
        channels = stage_in_chs[i] if placement == 'before' else stage_out_chs[i]
        index = {'end': len(stage), 'first': 1, 'before': 0}[placement]
        out.append(_with_pool(stage, index, make_stage_pool(arch, i, channels, **kwargs)))
    return out


class PooledBackbone:
    """The surgery path of a pooled family, mixed into its timm model class: ``reshape`` turns the stock model
    built by ``__init__`` into the network of an ``ArchSpec``. A family says how its model looks through the methods
    below that raise NotImplementedError."""
    family: str

    def _stem_conv(self) -> nn.Module:
        """The stem's (first) convolution."""
        raise NotImplementedError

    def _stem_chs(self) -> int:
        """Channels of the stem's output."""
        raise NotImplementedError

    def _stages(self) -> List[nn.Sequential]:
        raise NotImplementedError

    def _set_stages(self, stages: List[nn.Sequential]) -> None:
        raise NotImplementedError

    def _restride(self, stage: nn.Sequential, stride: int, pooled: bool, **dd: Any) -> None:
        """A stage's first block at ``stride`` (skip), or at stride 1 under a pooling layer (``pooled``)."""
        raise NotImplementedError

    @staticmethod
    def _strided_conv(block: nn.Module) -> nn.Module:
        """The convolution of a stage's first block that takes the stage's stride."""
        raise NotImplementedError

    @staticmethod
    def _block_out_chs(block: nn.Module) -> int:
        raise NotImplementedError

    def _place_prepool(self, pool: nn.Module) -> None:
        """Put the stem pre-pool after the stem."""
        raise NotImplementedError

    def reshape(self, arch: ArchSpec, placement: str, dynamic_kernels: int, dynamic_temperature: float,
                **dd: Any) -> List[int]:
        """Reshape the stock model into ``arch``'s network (see the module docstring), in place; returns the output
        channels of every stage.

        Args:
            arch: The architecture.
            placement: 'paper' or 'block' (``resolve_placement``).
            dynamic_kernels: K of the dynamic convolutions (``dy``).
            dynamic_temperature: Their softmax temperature.
            **dd: device and dtype of the new modules.
        """
        self.arch = arch
        self.placement = resolve_placement(placement, arch)
        set_stride(self._stem_conv(), arch.stem_conv_stride)
        stages = self._stages()
        for stage, stride in zip(stages, arch.strides):
            self._restride(stage, stride, is_pooled(arch, stride), **dd)
        if arch.dynamic:
            convert_dynamic_conv(self, num_kernels=dynamic_kernels, temperature=dynamic_temperature)
        pool_kw = dict(dynamic=arch.dynamic, dynamic_kernels=dynamic_kernels, dynamic_temperature=dynamic_temperature,
                       **dd)
        if arch.prepool is not None:
            self._place_prepool(make_prepool(arch, self._stem_chs(), **pool_kw))
        out_chs = [self._block_out_chs(stage[0]) for stage in stages]
        in_chs = [self._stem_chs()] + out_chs[:-1]
        self._set_stages(place_stage_pools(arch, self.placement, stages, in_chs, out_chs, self._strided_conv,
                                           **pool_kw))
        init_paper_weights(self, self.family)
        return out_chs


def pooled_group_matcher(matcher: Dict[str, Any], pool_regex: str, placement: str) -> Dict[str, Any]:
    """A fine-grained timm group matcher with the stage pools (matched by ``pool_regex``) as their own groups, in
    order: before a stage's first block, after it, or after the stage's last block (in the block placement the pool
    is part of the first block)."""
    position = {'before': -0.5, 'first': 0.5, 'end': 1e4}.get(placement)
    if position is None:
        return matcher
    blocks = matcher['blocks']
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else [(blocks, None)]
    return dict(matcher, blocks=[(pool_regex, (position,))] + blocks)


def init_paper_weights(model: nn.Module, family: str) -> None:
    """The weight init of the paper's code, over every module of the network (pooling layers included).

    ResNet: convs kaiming-normal (fan_out), their biases and linear layers as torch initialises them. MobileNetV2:
    convs ``normal(0, sqrt(2 / (k * k * out)))``, biases 0, linear layers ``normal(0, 0.01)``. Both: BN weight 1, bias
    0; dynamic convs their own init (kernels kaiming-uniform, attention kaiming-normal); attention as
    ``nn.MultiheadAttention`` initialises itself (input projection xavier-uniform, biases 0); position tables
    uniform on [0, 1); deformable offsets and masks zero.
    """
    own = {id(m) for parent in model.modules() if isinstance(parent, (DynamicConv2d, Attention))
           for m in parent.modules() if m is not parent}
    for m in model.modules():
        if id(m) in own:
            continue
        if isinstance(m, DynamicConv2d):
            m.reset_parameters()
        elif isinstance(m, Attention):
            nn.init.xavier_uniform_(m.qkv.weight)
            nn.init.zeros_(m.qkv.bias)
            if family == 'mobilenetv2':
                nn.init.normal_(m.proj.weight, 0, 0.01)
            else:
                m.proj.reset_parameters()
            nn.init.zeros_(m.proj.bias)
        elif isinstance(m, nn.Conv2d):
            if family == 'resnet':
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            else:
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2. / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and family == 'mobilenetv2':
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, LearnedPosEmbed2d):
            nn.init.uniform_(m.row_embed.weight)
            nn.init.uniform_(m.col_embed.weight)
    for m in model.modules():
        if isinstance(m, DeformConv2d):
            m.reset_offset()
