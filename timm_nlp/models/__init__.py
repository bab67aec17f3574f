from . import pooled_mobilenetv2, pooled_resnet
from ._registry import (
    GRID_POOLS, MANIFEST_PATH, PAPER_EXAMPLES, classifier_weight_key, create_model, family_default_cfgs, generic_name,
    grid_specs, list_pooled_models, load_manifest, pooled_cfg, register_pretrained)
from ._convert import PaperCheckpointError, convert_paper_state_dict
from ._surgery import PLACEMENTS, init_paper_weights
from ._weights import (
    TransferReport, adapt_input_channels, adapt_stock_state_dict, checkpoint_filter_fn, load_stock_source,
    load_stock_weights)
from .pooled_mobilenetv2 import PooledMobileNetV2
from .pooled_resnet import PooledResNet
