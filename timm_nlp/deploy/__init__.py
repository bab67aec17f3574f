"""Deployment to microcontrollers: int8 TFLite models that TensorFlow Lite Micro runs, and the arena it measures.

Needs the ``deploy`` extra: ``pip install 'timm-nlp[deploy]'`` (litert-torch, ai-edge-litert, tflite-micro).
"""
import os
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # LiteRT's C++ start-up logs
warnings.filterwarnings('ignore', message='.*is an Enum subclass and is now natively supported.*')
try:
    import ai_edge_litert  # noqa: F401
    import litert_torch  # noqa: F401
    import tflite_micro  # noqa: F401
except ImportError as e:
    raise ImportError(f"timm-nlp's deployment needs the deploy extra (missing: {e.name}): pip install "
                      "'timm-nlp[deploy]' (litert-torch, ai-edge-litert and the pre-release tflite-micro).") from None

from .flatbuffer import float_ops, io_quantization, live_bytes_peak, op_census, op_list
from .tflite import TFLiteModel, export_tflite
from .tflm import ArenaUse, TFLMError, litert_reference, lsb_agreement, tflm_arena, tflm_run
