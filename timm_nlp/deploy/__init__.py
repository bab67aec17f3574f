"""Deployment to microcontrollers: int8 TFLite models that TensorFlow Lite Micro runs, and the arena it measures.

Needs the ``deploy`` extra: ``pip install 'timm-nlp[deploy]'`` (litert-torch, ai-edge-litert, tflite-micro).
"""
import logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # LiteRT's C++ start-up logs
logging.getLogger('torch.utils._pytree').setLevel(logging.ERROR)  # a deprecation its libraries trigger on import
try:
    import ai_edge_litert  # noqa: F401
    import litert_torch  # noqa: F401
    import tflite_micro  # noqa: F401
except ImportError as e:
    raise ImportError(f"timm-nlp's deployment needs the deploy extra (missing: {e.name}): pip install "
                      "'timm-nlp[deploy]' (litert-torch, ai-edge-litert and the pre-release tflite-micro).") from None

from .flatbuffer import float_ops, fuse_split, io_quantization, live_bytes_peak, op_census, op_list  # noqa: E402
from .tflite import TFLiteModel, export_tflite  # noqa: E402
from .tflm import ArenaUse, TFLMError, litert_reference, lsb_agreement, tflm_arena, tflm_run  # noqa: E402
