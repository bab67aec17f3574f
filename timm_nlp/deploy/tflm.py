"""Running a .tflite model in TensorFlow Lite Micro's own interpreter (the runtime of microcontrollers) and LiteRT's
reference kernels, and measuring the tensor arena TFLite Micro needs.

TFLite Micro plans every activation into one arena at start-up: its head (the memory planner's buffers) and its tail
(what each kernel keeps: per-channel quantisation, node structures). A run with an arena that is too small fails at
start-up, and can take its process down: every TFLite Micro run here is a child process.
"""
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = ['ArenaUse', 'TFLMError', 'tflm_arena', 'tflm_run', 'litert_reference', 'lsb_agreement']

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_tflm_child.py')
_ALIGN = 16  # TFLite Micro aligns its buffers to 16 bytes


class TFLMError(ValueError):
    """TFLite Micro could not build or run the model (the reason from its log)."""


@dataclass
class ArenaUse:
    """The tensor arena of one model in TFLite Micro, in bytes: the smallest that runs (``arena_bytes``), its head
    (activation buffers, as the memory planner placed them) and tail (kernels' persistent data)."""
    arena_bytes: int
    head: int
    tail: int
    searched: bool


def _run_child(model_path: str, arena: int, inputs: Optional[np.ndarray], print_allocations: bool = False,
               timeout: float = 900) -> Tuple[bool, Optional[np.ndarray], str]:
    with tempfile.TemporaryDirectory() as d:
        args = [sys.executable, _CHILD, model_path, str(arena)]
        out_path = os.path.join(d, 'outputs.npy')
        if inputs is not None:
            in_path = os.path.join(d, 'inputs.npy')
            np.save(in_path, inputs)
            args += [in_path, out_path]
        if print_allocations:
            args.append('--print-allocations')
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
        ok = proc.returncode == 0 and 'OK' in proc.stdout
        outputs = np.load(out_path) if ok and inputs is not None else None
        return ok, outputs, f'{proc.stdout}{proc.stderr}\n(exit status {proc.returncode})'


def _reason(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip() and not line.startswith('(exit status')]
    status = log.rsplit('(exit status ', 1)[-1].rstrip(')\n')
    signal = f'killed by signal {-int(status)}' if status.lstrip('-').isdigit() and int(status) < 0 else ''
    return '; '.join(([signal] if signal else []) + lines[-3:]) or 'no message'


def _with_model(model: bytes):
    f = tempfile.NamedTemporaryFile(suffix='.tflite', delete=False)
    f.write(model)
    f.close()
    return f.name


def tflm_arena(model: bytes, search: bool = True, limit: int = 1 << 31) -> ArenaUse:
    """The tensor arena ``model`` needs in TFLite Micro.

    One run with an ample arena reports what TFLite Micro allocated (head + tail); with ``search``, runs with that
    size and 16 bytes less confirm it is the smallest that runs (else a bisection finds it).

    Args:
        model: The .tflite flatbuffer.
        search: Confirm (or find) the smallest arena that runs.
        limit: The largest arena tried.
    """
    path = _with_model(model)
    try:
        arena, log = 1 << 24, ''
        while arena <= limit:
            ok, _, log = _run_child(path, arena, None, print_allocations=True)
            if ok:
                break
            if "Didn't find op" in log or 'not supported' in log.lower():
                raise TFLMError(f'TFLite Micro cannot run this model: {_reason(log)}')
            arena *= 4  # too small (it may have crashed rather than said so): a larger one
        else:
            raise TFLMError(f'TFLite Micro cannot run this model with an arena of up to {limit} bytes: '
                            f'{_reason(log)}')
        numbers = {k: int(v) for k, v in re.findall(r'Arena allocation (total|head|tail) (\d+) bytes', log)}
        total, head, tail = numbers['total'], numbers['head'], numbers['tail']
        if not search:
            return ArenaUse(total, head, tail, False)
        if _run_child(path, total, None)[0] and not _run_child(path, total - _ALIGN, None)[0]:
            return ArenaUse(total, head, tail, True)
        lo, hi = 0, arena  # bisection: lo fails, hi runs
        while hi - lo > _ALIGN:
            mid = (lo + hi) // 2 // _ALIGN * _ALIGN
            if mid <= lo:
                break
            lo, hi = (lo, mid) if _run_child(path, mid, None)[0] else (mid, hi)
        return ArenaUse(hi, head, tail, True)
    finally:
        os.unlink(path)


def tflm_run(model: bytes, inputs: np.ndarray, arena: int = 1 << 26) -> np.ndarray:
    """The outputs of TFLite Micro on ``inputs`` (samples stacked on the first axis, each in the model's input
    shape and type)."""
    path = _with_model(model)
    try:
        ok, outputs, log = _run_child(path, arena, inputs)
    finally:
        os.unlink(path)
    if not ok:
        raise TFLMError(f'TFLite Micro failed: {_reason(log)}')
    return outputs


def litert_reference(model: bytes, inputs: np.ndarray, kernels: str = 'reference') -> np.ndarray:
    """The outputs of LiteRT's interpreter on ``inputs`` (stacked like ``tflm_run``'s).

    Args:
        model: The flatbuffer.
        inputs: Samples stacked on the first axis.
        kernels: 'reference' (``BUILTIN_REF``, LiteRT's reference kernels) or 'builtin' (its optimised kernels).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolvers = {'reference': OpResolverType.BUILTIN_REF, 'builtin': OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    if kernels not in resolvers:
        raise ValueError(f"kernels '{kernels}' is not one of {', '.join(resolvers)}.")
    interpreter = Interpreter(model_content=model, experimental_op_resolver_type=resolvers[kernels])
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0]['index'], interpreter.get_output_details()[0]['index']
    outputs = []
    for x in inputs:
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out).copy())
    return np.stack(outputs)


def lsb_agreement(a: np.ndarray, b: np.ndarray) -> Tuple[float, int]:
    """The fraction of int8 outputs at most one step (LSB) apart, and the largest difference in steps."""
    d = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return float((d <= 1).mean()), int(d.max())
