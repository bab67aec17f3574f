"""MMDetection: the pooled backbones in MMDetection's model registry, in the paper's config form

    backbone=dict(type='TimmNLPBackbone', name='resnet18-nlp_headfix2_nowin_reduced-1222', out_indices=(1, 2, 3, 4))

``register_mmdet()`` registers into ``mmdet.registry.MODELS`` (done on import when MMDetection is installed)
or into any mmengine ``Registry`` given.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .torchvision_detectors import PooledBackbone, Weights

__all__ = ['TimmNLPBackbone', 'register_mmdet']


class TimmNLPBackbone(nn.Module):
    """A pooled backbone returning the tuple of feature maps MMDetection necks expect."""

    def __init__(self, name: str, out_indices: Sequence[int] = (1, 2, 3, 4), weights: Weights = None,
                 init_cfg: Optional[dict] = None):
        super().__init__()
        self.backbone = PooledBackbone(name, out_indices, weights)
        self.init_cfg = init_cfg
        self.out_channels = self.backbone.channels
        self.strides = self.backbone.strides

    def init_weights(self) -> None:
        """Weights come from the timm model's own initialisation or ``weights``; nothing to do."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.backbone(x).values())


def register_mmdet(registry=None):
    """Register ``TimmNLPBackbone`` in ``registry`` (default: MMDetection's MODELS); returns the registry."""
    if registry is None:
        from mmdet.registry import MODELS as registry
    registry.register_module(name='TimmNLPBackbone', module=TimmNLPBackbone, force=True)
    return registry
