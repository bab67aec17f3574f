"""torchvision detectors (Faster R-CNN with FPN, RetinaNet, SSD) on pooled timm backbones.

The backbone is the timm model with ``features_only=True`` (timm's feature getter over
``forward_intermediates``); its ``feature_info`` reductions, which follow the stride digits, set the FPN
levels, the anchor sizes (a fixed multiple of each level's stride) and SSD's default-box steps.
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from timm.models._features import FeatureGetterNet, feature_take_indices

from timm_nlp.checkpoint import load_weights
from timm_nlp.models import create_model

__all__ = ['PooledBackbone', 'FPNBackbone', 'SSDBackbone', 'StridedAnchorGenerator', 'fasterrcnn', 'retinanet',
           'ssd']

Weights = Optional[Union[str, Dict[str, torch.Tensor]]]


class PooledBackbone(nn.Module):
    """The feature maps of a pooled (or any timm) model as an ``OrderedDict`` named '0', '1', ...

    Args:
        name: Registered name or architecture string.
        out_indices: Feature levels in increasing order, each once (0 is the stem; 1..4 the ResNet stages; negative
            ones count from the last).
        weights: A classification checkpoint of the same architecture (file or state dict); its classifier is
            dropped, every other tensor must match.
    """

    def __init__(self, name: str, out_indices: Sequence[int] = (1, 2, 3, 4), weights: Weights = None, **kwargs):
        super().__init__()
        if not out_indices:
            raise ValueError(f'out_indices is empty; give the feature levels to use, e.g. (1, 2, 3, 4) for {name}.')
        self.name, self.model_kwargs = name, kwargs
        model = create_model(name, **kwargs)
        self.out_indices = tuple(feature_take_indices(len(model.feature_info), out_indices)[0])
        if list(self.out_indices) != sorted(set(self.out_indices)):
            raise ValueError(f'out_indices {tuple(out_indices)} (levels {self.out_indices}) must increase, each level '
                             'once: the features come in stage order.')
        self.body = FeatureGetterNet(model, out_indices=self.out_indices)
        self.channels: List[int] = self.body.feature_info.channels()
        self.strides: List[int] = self.body.feature_info.reduction()
        if weights is not None:
            self.load_classification_weights(weights)

    def load_classification_weights(self, weights: Union[str, Dict[str, torch.Tensor]]) -> None:
        """Load a classification checkpoint of the architecture (file, read by ``load_weights``, or state dict).

        The classifier is dropped; every other tensor of the full classification model must be present with its
        shape (a ``ValueError`` names the mismatches). Tensors of the stages past the last feature level, which
        the feature getter prunes, are checked and not loaded.
        """
        state = load_weights(weights) if isinstance(weights, str) else dict(weights)
        full = create_model(self.name, device='meta', **self.model_kwargs)
        head = full.pretrained_cfg.get('classifier') or ''
        is_head = lambda k: bool(head) and k.startswith(head + '.')  # noqa: E731
        state = {k: v for k, v in state.items() if not is_head(k)}
        target = {k: v for k, v in full.state_dict().items() if not is_head(k)}
        wrong = [f'{k} {tuple(v.shape)} vs {tuple(target[k].shape)}' for k, v in state.items()
                 if k in target and v.shape != target[k].shape]
        # BatchNorm fills absent num_batches_tracked counters, as a strict load_state_dict does
        missing = [k for k in target if k not in state and not k.endswith('num_batches_tracked')]
        unexpected = [k for k in state if k not in target]
        if wrong or missing or unexpected:
            raise ValueError(f'Classification weights do not match {self.name}: shapes {wrong[:4]}, missing '
                             f'{missing[:4]}, unexpected {unexpected[:4]}.')
        model = self.body.model
        kept = model.state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k in kept}, strict=True)

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        return OrderedDict((str(i), f) for i, f in enumerate(self.body(x)))


class FPNBackbone(nn.Module):
    """``PooledBackbone`` + torchvision's FeaturePyramidNetwork; ``strides`` include the extra levels."""

    def __init__(self, body: PooledBackbone, out_channels: int = 256, extra: Optional[ExtraFPNBlock] = None,
                 extra_strides: Sequence[int] = ()):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        self.strides = list(body.strides) + [body.strides[-1] * s for s in extra_strides]

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        return self.fpn(self.body(x))


class SSDBackbone(nn.Module):
    """``PooledBackbone`` followed by SSD's extra stride-2 blocks (1x1 then 3x3 conv, ReLU)."""

    def __init__(self, body: PooledBackbone, extra_channels: Sequence[int] = (512, 256)):
        super().__init__()
        self.body = body
        blocks, in_chs = [], body.channels[-1]
        for c in extra_channels:
            blocks.append(nn.Sequential(nn.Conv2d(in_chs, c // 2, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.ReLU(inplace=True)))
            in_chs = c
        self.extra = nn.ModuleList(blocks)
        self.strides = list(body.strides) + [body.strides[-1] * 2 ** (i + 1) for i in range(len(blocks))]

    def forward(self, x: torch.Tensor) -> 'OrderedDict[str, torch.Tensor]':
        feats = self.body(x)
        last = next(reversed(feats.values()))
        for i, block in enumerate(self.extra):
            last = block(last)
            feats[str(len(feats))] = last
        return feats


class StridedAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` tiled at the backbone's feature strides.

    torchvision steps each level by padded image size // grid size, which drifts from the feature stride when the
    padded size is no multiple of it (800 // 7 = 114 for a stride-128 level); here the step is the stride.
    """

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int]):
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
        self.strides = list(strides)

    def forward(self, image_list: ImageList, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f'{len(feature_maps)} feature maps for anchors at {len(self.strides)} strides.')
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        steps = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors(grid_sizes, steps)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


def _check_pow2(strides: Sequence[int], what: str) -> None:
    if any(s & (s - 1) for s in strides):
        raise ValueError(f'{what} needs power-of-two feature strides (RoIAlign maps boxes to levels by powers of '
                         f'two); this backbone has strides {list(strides)}. Use a pre-pool stride of 2, 4 or 8.')


def fasterrcnn(name: str, num_classes: int = 91, out_indices: Sequence[int] = (1, 2, 3, 4), weights: Weights = None,
               fpn_channels: int = 256, anchor_scale: int = 8, **kwargs) -> FasterRCNN:
    """Faster R-CNN with FPN; anchors of ``anchor_scale x stride`` per level (torchvision's 32..512 at stock).

    RoIAlign needs power-of-two feature strides that double from one level to the next (4, 8, 16, 32 at stock).

    ``kwargs`` go to torchvision's FasterRCNN (min_size, max_size, ...)."""
    backbone = FPNBackbone(PooledBackbone(name, out_indices, weights), fpn_channels, LastLevelMaxPool(), (2,))
    _check_pow2(backbone.strides, 'Faster R-CNN')
    body = backbone.body
    if any(b != 2 * a for a, b in zip(body.strides, body.strides[1:])):
        raise ValueError(f'Faster R-CNN needs feature strides that double from level to level (RoIAlign maps boxes to '
                         f'consecutive power-of-two levels); out_indices {body.out_indices} of {name} give strides '
                         f'{body.strides}. Use consecutive levels whose stride digits are 2.')
    anchors = StridedAnchorGenerator([(anchor_scale * s,) for s in backbone.strides],
                                     [(0.5, 1.0, 2.0)] * len(backbone.strides), backbone.strides)
    roi_pool = MultiScaleRoIAlign([str(i) for i in range(len(out_indices))], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi_pool, **kwargs)


def retinanet(name: str, num_classes: int = 91, out_indices: Sequence[int] = (2, 3, 4), weights: Weights = None,
              fpn_channels: int = 256, anchor_scale: int = 4, **kwargs) -> RetinaNet:
    """RetinaNet: FPN on the last three stages plus P6/P7, three anchor scales per level from
    ``anchor_scale x stride`` (torchvision's 32..512 at stock)."""
    backbone = FPNBackbone(PooledBackbone(name, out_indices, weights), fpn_channels,
                           LastLevelP6P7(fpn_channels, fpn_channels), (2, 4))
    sizes = tuple(tuple(int(anchor_scale * s * 2 ** (k / 3)) for k in range(3)) for s in backbone.strides)
    anchors = StridedAnchorGenerator(sizes, [(0.5, 1.0, 2.0)] * len(sizes), backbone.strides)
    return RetinaNet(backbone, num_classes, anchor_generator=anchors, **kwargs)


def ssd(name: str, num_classes: int = 91, size: int = 300, out_indices: Sequence[int] = (2, 3, 4),
        weights: Weights = None, **kwargs) -> SSD:
    """SSD on the last three stages plus two extra blocks; default boxes tiled at the measured strides."""
    backbone = SSDBackbone(PooledBackbone(name, out_indices, weights))
    n = len(backbone.strides)
    boxes = DefaultBoxGenerator([[2]] + [[2, 3]] * (n - 2) + [[2]], steps=backbone.strides)
    return SSD(backbone, boxes, (size, size), num_classes, **kwargs)
