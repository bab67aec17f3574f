"""Ctrl-C that is never lost during training.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives; raised inside a finaliser (a file
object closed while a checkpoint is written, an object the garbage collector frees), it is printed as "Exception
ignored" and dropped, and the run goes on. ``remembered_interrupts`` also records the interrupt (silently where it is
dropped), and ``raise_if_interrupted`` (called between batches) raises it again.
"""
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

__all__ = ['remembered_interrupts', 'raise_if_interrupted']

_state = {'interrupted': False}


def _on_sigint(signum: int, frame: object) -> None:
    _state['interrupted'] = True
    raise KeyboardInterrupt


@contextmanager
def remembered_interrupts() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` and is remembered until the block ends, and one dropped in a finaliser
    prints nothing (on the main thread, where Python delivers signals, and where SIGINT has Python's default handler:
    one set by the caller or an ignored SIGINT is left as it is)."""
    installed = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _state['interrupted'] = False
    unraisable = sys.unraisablehook

    def hook(u) -> None:
        if u.exc_type is not KeyboardInterrupt:  # a dropped interrupt is remembered, not printed
            unraisable(u)
    if installed:
        signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = hook
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.unraisablehook = unraisable
        _state['interrupted'] = False


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived inside ``remembered_interrupts`` (even if Python dropped it)."""
    if _state['interrupted']:
        raise KeyboardInterrupt
