"""timm-nlp: Self-Attentive (non-local) Pooling and its rival pooling methods for timm."""
from .grammar import PoolSpec
from .layers import create_pool2d
from .version import __version__
