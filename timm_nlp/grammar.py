"""Naming grammar of timm-nlp: pooling names such as ``nlp_headfix2_nowin_reduced``.

A pooling name is ``METHOD[_MODIFIER...]``. Parsing is case-insensitive and modifiers may come in any
order; the canonical form lists them in the order of ``POOL_MODIFIERS``.
"""
from dataclasses import dataclass
from typing import Tuple

__all__ = ['POOL_METHODS', 'NONLOCAL_METHODS', 'POOL_MODIFIERS', 'PoolSpec']

POOL_METHODS = ('skip', 'maxp', 'avgp', 'lip', 'gaussian_pool', 'nlp', 'dfmnlp', 'mixp', 'dfmixp')
NONLOCAL_METHODS = ('nlp', 'dfmnlp', 'mixp', 'dfmixp')
POOL_MODIFIERS = ('headfix2', 'nowin', 'reduced')


@dataclass(frozen=True)
class PoolSpec:
    """A parsed pooling name: the method and its (canonically ordered) modifiers."""
    method: str
    modifiers: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in POOL_METHODS:
            raise ValueError(f"Unknown pooling method '{self.method}'. Valid methods: {', '.join(POOL_METHODS)}.")
        for mod in self.modifiers:
            if mod not in POOL_MODIFIERS:
                raise ValueError(
                    f"Unknown pooling modifier '{mod}'. Valid modifiers: {', '.join(POOL_MODIFIERS)}.")
        if len(set(self.modifiers)) != len(self.modifiers):
            raise ValueError(f"Repeated pooling modifier in {self.modifiers}.")
        if self.modifiers and self.method not in NONLOCAL_METHODS:
            raise ValueError(
                f"Pooling method '{self.method}' takes no modifiers (got '{'_'.join(self.modifiers)}'); "
                f"modifiers apply to: {', '.join(NONLOCAL_METHODS)}.")
        object.__setattr__(self, 'modifiers', tuple(m for m in POOL_MODIFIERS if m in self.modifiers))

    @classmethod
    def parse(cls, name: str) -> 'PoolSpec':
        """Parse ``METHOD[_MODIFIER...]`` (case-insensitive)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"Pooling name must be a non-empty string, got {name!r}. "
                             f"Valid methods: {', '.join(POOL_METHODS)}.")
        lname = name.lower()
        for method in sorted(POOL_METHODS, key=len, reverse=True):
            if lname == method or lname.startswith(method + '_'):
                rest = lname[len(method) + 1:]
                return cls(method, tuple(rest.split('_')) if rest else ())
        head = lname.split('_')[0]
        raise ValueError(f"Unknown pooling method '{head}' in '{name}'. Valid methods: {', '.join(POOL_METHODS)}.")

    @property
    def headfix2(self) -> bool:
        return 'headfix2' in self.modifiers

    @property
    def nowin(self) -> bool:
        return 'nowin' in self.modifiers

    @property
    def reduced(self) -> bool:
        return 'reduced' in self.modifiers

    @property
    def is_nonlocal(self) -> bool:
        return self.method in NONLOCAL_METHODS

    def __str__(self) -> str:
        return '_'.join((self.method,) + self.modifiers)
