"""MMDetection: the pooled backbones in MMDetection's model registry, in the paper's config form

    backbone=dict(type='TimmNLPBackbone', name='resnet18-nlp_headfix2_nowin_reduced-1222', out_indices=(1, 2, 3, 4))

``register_mmdet()`` registers into ``mmdet.registry.MODELS`` (done on import when MMDetection is installed)
or into any mmengine ``Registry`` given.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from timm_nlp.checkpoint import load_weights

from .torchvision_detectors import PooledBackbone, Weights

__all__ = ['TimmNLPBackbone', 'register_mmdet']


class TimmNLPBackbone(nn.Module):
    """A pooled backbone returning the tuple of feature maps MMDetection necks expect.

    ``init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix=None)`` loads a classification checkpoint in
    ``init_weights()`` (called by MMDetection's runner), read safely and checked as ``weights`` is (see
    ``PooledBackbone.load_classification_weights``); ``prefix`` selects a sub-dict, e.g. ``'backbone.'``.
    """

    def __init__(self, name: str, out_indices: Sequence[int] = (1, 2, 3, 4), weights: Weights = None,
                 init_cfg: Optional[dict] = None):
        super().__init__()
        if init_cfg is not None and (not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained'
                                     or 'checkpoint' not in init_cfg
                                     or set(init_cfg) - {'type', 'checkpoint', 'prefix'}):
            raise ValueError("TimmNLPBackbone supports only init_cfg=dict(type='Pretrained', checkpoint=PATH, "
                             f'prefix=None), got {init_cfg!r}.')
        self.backbone = PooledBackbone(name, out_indices, weights)
        self.init_cfg = init_cfg
        self.out_channels = self.backbone.channels
        self.strides = self.backbone.strides

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint; without ``init_cfg`` the timm initialisation (or ``weights``) stays."""
        if self.init_cfg is None:
            return
        state = load_weights(self.init_cfg['checkpoint'])
        prefix = self.init_cfg.get('prefix')
        if prefix:
            prefix = prefix if prefix.endswith('.') else prefix + '.'
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise ValueError(f"No tensor of '{self.init_cfg['checkpoint']}' starts with prefix '{prefix}'.")
        self.backbone.load_classification_weights(state)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.backbone(x).values())


def register_mmdet(registry=None):
    """Register ``TimmNLPBackbone`` in ``registry`` (default: MMDetection's MODELS); returns the registry."""
    if registry is None:
        from mmdet.registry import MODELS as registry
    registry.register_module(name='TimmNLPBackbone', module=TimmNLPBackbone, force=True)
    return registry
