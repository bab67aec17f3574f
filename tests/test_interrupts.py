"""Ctrl-C during training is never lost: an interrupt Python drops inside a finaliser is raised at the next batch."""
import os
import signal
import sys

import pytest

from timm_nlp.interrupts import raise_if_interrupted, remembered_interrupts


class _InterruptedWhileFinalised:
    """Ctrl-C arriving while an object is finalised (as a file object closed while a checkpoint is written)."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # the interrupt is raised here, inside __del__, where Python drops it


def test_an_interrupt_dropped_in_a_finaliser_is_raised_at_the_next_check(monkeypatch):
    dropped = []
    monkeypatch.setattr(sys, 'unraisablehook', lambda u: dropped.append(u.exc_type))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    obj = _InterruptedWhileFinalised()
    del obj  # without the guard, the interrupt is lost: nothing is raised here
    assert dropped == [KeyboardInterrupt]
    raise_if_interrupted()  # and nothing is remembered
    with remembered_interrupts():
        obj = _InterruptedWhileFinalised()
        del obj
        assert dropped == [KeyboardInterrupt]  # dropped silently this time ("Exception ignored" is not printed)
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    assert sys.unraisablehook is not None and sys.unraisablehook.__name__ == '<lambda>'  # the caller's hook back
    # the default handler back, nothing remembered
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    raise_if_interrupted()


def test_a_handler_of_the_caller_is_left_alone():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda *a: seen.append(1))
    try:
        with remembered_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))
            raise_if_interrupted()
        assert seen == [1]
    finally:
        signal.signal(signal.SIGINT, previous)
