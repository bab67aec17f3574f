"""Detection with pooled backbones: torchvision detectors, COCO mAP, MMDetection registration."""
from .coco_eval import coco_map, predictions_to_coco
from .mmdet import TimmNLPBackbone, register_mmdet
from .torchvision_detectors import FPNBackbone, PooledBackbone, SSDBackbone, fasterrcnn, retinanet, ssd

try:  # MMDetection installed: register the backbone with it
    register_mmdet()
except ImportError:
    pass
