"""Export to TFLite with static int8 post-training quantisation, for TFLite Micro.

The path: the model as it is deployed (``timm_nlp.profiler.deployed_form``: its layers in their export
forms, the ops TFLite Micro runs, norms folded, stride-2 convolutions padded as TFLite pads); optionally its
high-resolution prefix patch by patch in the same graph (``timm_nlp.patch_based``); an NHWC int8 interface
(``litert_torch.to_channel_last_io``); ``torch.export``; PT2E quantisation (``FullInt8Quantizer``) calibrated on real
images; litert-torch's converter; int8 inputs and outputs; the ops TFLite Micro runs in float only moved to float;
softmax rows too long for its int8 output given an int16 one.
"""
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import litert_torch
from litert_torch.quantize.quant_config import QuantConfig
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from timm_nlp._modules import has_submodule
from timm_nlp.export_model import DEFAULT_CHUNK
from timm_nlp.patching import deployed_patch_based, lowest_patched_profile
from timm_nlp.profiler import deployed_form
from .flatbuffer import (float_ops, fuse_l2_normalization, fuse_log_softmax, fuse_split, io_quantization, op_census,
                         to_int8_io, widen_softmax)
from .quantizer import FullInt8Quantizer, call_site

__all__ = ['TFLiteModel', 'export_tflite']


@dataclass
class TFLiteModel:
    """An exported model: the flatbuffer and what it holds."""
    flatbuffer: bytes
    input_size: Tuple[int, int, int]
    ops: Dict[str, int]
    float_ops: List[str]
    io: Dict[str, list]
    patches: Optional[int] = None
    split: Optional[str] = None
    chunk: Optional[int] = None
    wide_softmax: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def fully_int8(self) -> bool:
        """No op computes in float, none quantises from or dequantises to float inside the graph (``wide_softmax``
        softmaxes write int16, requantised to int8 by an integer QUANTIZE)."""
        return not self.float_ops

    def save(self, path: str) -> None:
        with open(path, 'wb') as f:
            f.write(self.flatbuffer)


@contextlib.contextmanager
def _quiet():
    """The converter's progress and its libraries' logs (printed to the process's stdout and stderr) kept out of the
    command's output, and shown only if the conversion fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode='w+') as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            log.seek(0)
            sys.stderr.write(log.read()[-4000:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _prepared(form: nn.Module, quantizer: FullInt8Quantizer, nhwc: torch.Tensor) -> Tuple[nn.Module, nn.Module]:
    """``form`` with an NHWC interface, exported and prepared for calibration; and the module it exported."""
    wrapped = litert_torch.to_channel_last_io(form, args=[0]).eval()
    with torch.no_grad():
        program = torch.export.export(wrapped, (nhwc[:1],), strict=False)
    return prepare_pt2e(program.module(), quantizer), wrapped


def _observers(prepared: nn.Module, roots: Tuple[nn.Module, ...]) -> Dict[tuple, List[nn.Module]]:
    """The activation observers of a prepared graph by the op they observe (``quantizer.call_site``): the module
    object that ran it, its innermost source line and its target. A module's path is resolved in the first of
    ``roots`` that has it (the exported wrapper; the model, whose names patch-based execution's views call their
    modules by)."""
    found: Dict[tuple, List[nn.Module]] = {}
    for n in prepared.graph.nodes:
        src = n.args[0] if n.op == 'call_module' and n.args else None
        if not isinstance(src, torch.fx.Node) or src.op != 'call_function':
            continue
        observer = prepared.get_submodule(n.target)
        path, lines, target = call_site(src)
        module = next((r.get_submodule(path) for r in roots if has_submodule(r, path)), None)
        if module is not None and hasattr(observer, 'min_val'):
            found.setdefault((id(module), lines[-1], target), []).append(observer)
    return found


def _observers_like(prepared: nn.Module, whole: nn.Module, roots: Tuple[nn.Module, ...]) -> None:
    """Give the observers of a patch-based graph the calibration of the whole-map graph's observers of the same op
    (the patches' halos and crops, calibrated on their own, would widen the ranges): an op the whole map runs k times
    (one source line, several calls) and the patches k x m times, in the same order on every patch."""
    reference = _observers(whole, roots)
    for key, observers in _observers(prepared, roots).items():
        ref = reference.get(key, [])
        if ref and len(observers) % len(ref) == 0:
            for i, obs in enumerate(observers):
                obs.load_state_dict(ref[i % len(ref)].state_dict())


def export_tflite(
        model: nn.Module,
        calibration: torch.Tensor,
        patches: Optional[int] = None,
        split: Optional[str] = None,
        chunk: Optional[int] = DEFAULT_CHUNK,
        widen: bool = True,
        observer: str = 'histogram',
) -> TFLiteModel:
    """Export ``model`` as an int8 TFLite model for TFLite Micro: int8 NHWC input, int8 output, static int8
    quantisation calibrated on ``calibration``.

    Args:
        model: A timm or timm-nlp model.
        calibration: Calibration images ``(N, C, H, W)``, preprocessed as the model takes them; their size is the
            model's input size.
        patches: Run the high-resolution prefix on ``patches x patches`` patches in the same graph
            (``timm_nlp.patch_based``; two-pass pools included).
        split: The last unit of the patch-based prefix (default: the lowest counted peak).
        chunk: Query rows at a time in the non-local attention over the most tokens; one over fewer tokens
            takes as many scores at a time (None: all rows at once).
        widen: Pad stride-2 convolutions as TFLite does (no PAD copies; exact).
        observer: Calibration observer, 'histogram' or 'minmax' (faster).

    Returns:
        The flatbuffer with its op census and the ops left in float (none for the package's layers).
    """
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    input_size = tuple(calibration.shape[1:])
    if patches:
        if split is None:
            split = lowest_patched_profile(model, input_size, patches)[0]
        # planned (on meta copies) before the tracing, not inside it
        patched = deployed_patch_based(model, input_size, patches, split, chunk, widen).eval()
        form = patched.model
    else:
        form = deployed_form(model, input_size, chunk, widen)
    nhwc = calibration.permute(0, 2, 3, 1).contiguous()
    quantizer = FullInt8Quantizer(observer)
    prepared, root = _prepared(form, quantizer, nhwc)
    if patches:
        whole, whole_root = prepared, root
        prepared, root = _prepared(patched, quantizer, nhwc)
    seconds['export'] = time.perf_counter() - start
    with torch.no_grad():
        for i in range(len(nhwc)):
            prepared(nhwc[i:i + 1])
            if patches:
                whole(nhwc[i:i + 1])
    if patches:  # the whole-map model's quantisation wherever the patches run the same op: the same int8 outputs
        _observers_like(prepared, whole, (root, whole_root, form))
    seconds['calibrate'] = time.perf_counter() - start - seconds['export']
    converted = convert_pt2e(prepared, fold_quantize=False)
    with _quiet():
        flat = litert_torch.convert(converted, (nhwc[:1],), quant_config=QuantConfig(pt2e_quantizer=quantizer))
        flat = flat.model_content()
    flat, norms = fuse_l2_normalization(fuse_log_softmax(to_int8_io(flat))[0])
    if norms != quantizer.l2_normalizations:  # left unfused, its int8 RSQRT would run with a ruinous range
        raise RuntimeError(f'{quantizer.l2_normalizations - norms} of the graph\'s {quantizer.l2_normalizations} L2 '
                           'normalisations were not recognised in the converted model as one L2_NORMALIZATION.')
    flat, wide = widen_softmax(fuse_split(flat)[0])
    seconds['convert'] = time.perf_counter() - start - seconds['export'] - seconds['calibrate']
    return TFLiteModel(flat, input_size, op_census(flat), float_ops(flat), io_quantization(flat),
                       patches, split if patches else None, chunk, wide, seconds)
