from . import efficientnet, resnet, resnetv2
from ._pooled import (
    TransferReport, adapt_input_channels, adapt_stock_state_dict, checkpoint_filter_fn, load_stock_source,
    load_stock_weights)
from ._registry import (
    GRID_POOLS, MANIFEST_PATH, PAPER_EXAMPLES, create_model, generic_name, grid_specs, list_pooled_models,
    load_manifest, register_pretrained)
from .efficientnet import PooledMobileNetV2
from .resnet import PooledResNet
from .resnetv2 import PooledResNetV2
