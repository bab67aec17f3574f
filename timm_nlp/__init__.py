"""timm-nlp: Self-Attentive (non-local) Pooling and its rival pooling methods for timm.

Importing the package registers every pooled backbone in timm's model registry.
"""
from .grammar import ArchSpec, PoolSpec
from .layers import create_pool2d
from .models import convert_paper_state_dict, create_model, list_pooled_models, load_stock_weights
from .patching import patch_based
from .version import __version__
