from .create_pool import create_pool2d, nlp_defaults
from .gaussian_pool import GaussianPool2d
from .self_attn_pool import DeformConv2d, SelfAttentiveImportance, nlp_embed_dim, upsample_patches
from .weighted_pool import LocalImportance, WeightedPool2d, scale_by_patches, weighted_pool2d
from .window_pool import WindowAvgPool2d, window_avg_pool2d
from .dynamic_conv import DynamicConv2d, convert_dynamic_conv, set_dynamic_temperature
