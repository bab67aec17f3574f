from .create_pool import REDUCED_PATCH_SIZES, STAGE_HEADS, create_pool2d, prepool_args, stage_pool_args
from .dynamic_conv import DynamicConv2d, convert_dynamic_conv, set_dynamic_temperature
from .gaussian_pool import GaussianPool2d
from .protocol import CompoundLayer, PatchSupport, PoolLayer, ShapeOnly, pool_output_size
from .self_attn_pool import (
    DeformConv2d, LearnedPosEmbed2d, SelfAttentiveImportance, nearest_index, nlp_embed_dim, resample_at_offsets,
    upsample_nearest)
from .weighted_pool import LocalImportance, WeightedPool2d, rename_legacy_keys, weighted_pool2d
from .window_pool import WindowAvgPool2d, WindowMaxPool2d, window_avg_pool2d, window_max_pool2d
