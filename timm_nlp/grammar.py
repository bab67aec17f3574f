"""Naming grammar of timm-nlp, in one place.

Pooling names: ``METHOD[_MODIFIER...]`` (``nlp_headfix2_nowin_reduced``); modifiers may come in any order,
the canonical form lists them in the order of ``POOL_MODIFIERS``.

Architectures, two spellings of one ``ArchSpec``:

* seed form (the paper's code): ``[prepool-POOL-S-][dy]BACKBONE-POOL-STRIDES``, e.g.
  ``prepool-nlp_headfix2-4-resnet18-nlp_headfix2-1222``;
* timm form (registered model names): ``[prepool_POOL_S_][dy]PREFIX_POOL_STRIDES``, e.g.
  ``prepool_nlp_headfix2_4_resnet18_nlp_headfix2_1222``, ``mobilenetv2_nlp_4222121``.

The six backbones of the paper's code and their timm-form prefixes: resnet18 / resnet50 (``resnet18``, ``resnet50``:
a stage's pool after its last block), resnet18_v2 / resnet50_v2 (``resnet18b1``, ``resnet50b1``: on its first
block's output; not timm's pre-activation ResNetV2), mobilenet_v2 (``mobilenetv2``: on its first block's output) and
mobilenet (``mobilenetv2b0``: before its first block; a MobileNetV2 too).

Parsing is case-insensitive; every malformed string raises a ValueError naming the bad token and the
valid choices.
"""
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple, Union

__all__ = [
    'POOL_METHODS', 'NONLOCAL_METHODS', 'POOL_MODIFIERS', 'PoolSpec', 'Backbone', 'BACKBONES', 'ArchSpec',
]

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
            if lname == method:
                return cls(method, ())
            if lname.startswith(method + '_'):
                return cls(method, tuple(lname[len(method) + 1:].split('_')))  # 'nlp_' has the empty modifier
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


@dataclass(frozen=True)
class Backbone:
    """A backbone of the grammar: its timm-form prefix, family, stock timm base model, stock stage strides and where
    a stage's pooling layer sits in the paper's code (``end``: after the stage's last block; ``first``: on the first
    block's output; ``before``: before the first block)."""
    seed: str
    prefix: str
    family: str
    base: str
    stock_strides: str
    placement: str

    @property
    def num_stages(self) -> int:
        return len(self.stock_strides)

    @property
    def stem_strides(self) -> Tuple[int, ...]:
        """The stem's down-sampling steps: ResNet's strided conv and max-pool, MobileNetV2's strided conv."""
        return (2, 2) if self.family == 'resnet' else (2,)


BACKBONES: Dict[str, Backbone] = {b.seed: b for b in (
    Backbone('resnet18', 'resnet18', 'resnet', 'resnet18', '1222', 'end'),
    Backbone('resnet50', 'resnet50', 'resnet', 'resnet50', '1222', 'end'),
    Backbone('resnet18_v2', 'resnet18b1', 'resnet', 'resnet18', '1222', 'first'),
    Backbone('resnet50_v2', 'resnet50b1', 'resnet', 'resnet50', '1222', 'first'),
    Backbone('mobilenet_v2', 'mobilenetv2', 'mobilenetv2', 'mobilenetv2_100', '1222121', 'first'),
    Backbone('mobilenet', 'mobilenetv2b0', 'mobilenetv2', 'mobilenetv2_100', '1222121', 'before'),
)}
_BY_PREFIX = {b.prefix: b for b in BACKBONES.values()}


def _choices(names) -> str:
    return ', '.join(names)


_POOL_HEADS = {m.split('_')[0] for m in POOL_METHODS}


def _backbone_prefix(name: str) -> Optional[str]:
    """The backbone prefix ``name`` (a lower-case timm name after any pre-pool) starts with, 'dy' allowed."""
    rest = name[2:] if name.startswith('dy') else name
    return next((p for p in sorted(_BY_PREFIX, key=len, reverse=True) if rest.startswith(p + '_')), None)


def _parse_strides(token: str, backbone: Backbone, where: str) -> Tuple[int, ...]:
    if not (token.isascii() and token.isdigit() and len(token) == backbone.num_stages and '0' not in token):
        raise ValueError(
            f"Invalid stride digits '{token}' in '{where}': {backbone.seed} takes {backbone.num_stages} digits 1-9, "
            f"one per stage (stock: {backbone.stock_strides}).")
    return tuple(int(c) for c in token)


def _parse_pool(token: str, where: str, what: str = 'pooling') -> PoolSpec:
    try:
        return PoolSpec.parse(token)
    except ValueError as e:
        raise ValueError(f"Invalid {what} '{token}' in '{where}': {e}") from None


def _parse_prepool_stride(token: str, where: str) -> int:
    if not (token.isascii() and token.isdigit()) or int(token) < 1:
        raise ValueError(f"Invalid pre-pool stride '{token}' in '{where}': expected an integer >= 1.")
    return int(token)


@dataclass(frozen=True)
class ArchSpec:
    """One pooled architecture: backbone, pooling, per-stage strides, dynamic convs and the stem pre-pool."""
    backbone: str
    pool: PoolSpec
    strides: Tuple[int, ...]
    dynamic: bool = False
    prepool: Optional[PoolSpec] = None
    prepool_stride: Optional[int] = None

    def __post_init__(self):
        name = self.backbone
        if name not in BACKBONES:
            raise ValueError(f"Unknown backbone '{self.backbone}'. Valid backbones: {_choices(BACKBONES)} "
                             "(optionally prefixed with 'dy').")
        if isinstance(self.pool, str):
            object.__setattr__(self, 'pool', PoolSpec.parse(self.pool))
        if isinstance(self.prepool, str):
            object.__setattr__(self, 'prepool', PoolSpec.parse(self.prepool))
        strides = self.strides
        if isinstance(strides, (str, int)):
            strides = _parse_strides(str(strides), BACKBONES[name], str(strides))
        strides = tuple(strides)
        if len(strides) != BACKBONES[name].num_stages or not all(isinstance(s, int) and 1 <= s <= 9 for s in strides):
            raise ValueError(f"Invalid strides {strides}: {name} takes {BACKBONES[name].num_stages} integers 1-9, one "
                             f"digit per stage (stock: {BACKBONES[name].stock_strides}).")
        object.__setattr__(self, 'strides', strides)
        if (self.prepool is None) != (self.prepool_stride is None):
            raise ValueError('A pre-pool needs both prepool and prepool_stride (got '
                             f'prepool={self.prepool}, prepool_stride={self.prepool_stride}).')
        if self.prepool_stride is not None and (not isinstance(self.prepool_stride, int) or self.prepool_stride < 1):
            raise ValueError(f'Invalid pre-pool stride {self.prepool_stride!r}: expected an integer >= 1.')

    @property
    def spec(self) -> Backbone:
        return BACKBONES[self.backbone]

    @property
    def digits(self) -> str:
        return ''.join(str(s) for s in self.strides)

    @property
    def seed(self) -> str:
        """The seed-form (paper) architecture string."""
        pre = f'prepool-{self.prepool}-{self.prepool_stride}-' if self.prepool is not None else ''
        return f"{pre}{'dy' if self.dynamic else ''}{self.backbone}-{self.pool}-{self.digits}"

    @property
    def timm_name(self) -> str:
        """The timm-form model name."""
        pre = f'prepool_{self.prepool}_{self.prepool_stride}_' if self.prepool is not None else ''
        return f"{pre}{'dy' if self.dynamic else ''}{self.spec.prefix}_{self.pool}_{self.digits}"

    @property
    def stem_strides(self) -> Tuple[int, ...]:
        """Down-sampling steps of the stem: the stock ones, or the pre-pool alone."""
        return (self.prepool_stride,) if self.prepool is not None else self.spec.stem_strides

    @property
    def stem_conv_stride(self) -> int:
        """The stride of the stem conv: the stock one, or under a pre-pool S for ``prepool-skip-S-`` (the conv takes
        the stride) and 1 for any other pre-pool (the pool takes it)."""
        if self.prepool is None:
            return self.spec.stem_strides[0]
        return self.prepool_stride if self.prepool.method == 'skip' else 1

    @property
    def reductions(self) -> Tuple[int, ...]:
        """Nominal reduction after the stem and after every stage."""
        r = 1
        for s in self.stem_strides:
            r *= s
        out = [r]
        for s in self.strides:
            r *= s
            out.append(r)
        return tuple(out)

    def output_sizes(self, img_size: int, pool_ceil_mode: bool = False) -> Tuple[int, ...]:
        """Side of the map after the stem and after every stage, for a square input: a strided convolution
        (``skip``, the stem) gives ``ceil(H / s)``, a pooling layer ``H // s`` (at least 1; ``ceil(H / s)`` with
        ``pool_ceil_mode``, the in-block placement)."""
        def pooled(size: int, s: int) -> int:
            return -(-size // s) if pool_ceil_mode else max(1, size // s)

        if self.prepool is None:
            size = -(-img_size // 2)
            if self.spec.family == 'resnet':
                size = max(1, size // 2)  # the stem max-pool: kernel 2, floor mode
        elif self.prepool.method == 'skip':
            size = -(-img_size // self.prepool_stride)
        else:
            size = max(1, img_size // self.prepool_stride)
        out = [size]
        for s in self.strides:
            if s > 1:
                size = -(-size // s) if self.pool.method == 'skip' else pooled(size, s)
            out.append(size)
        return tuple(out)

    def output_size(self, img_size: int, pool_ceil_mode: bool = False) -> int:
        """Side of the final feature map for a square input."""
        return self.output_sizes(img_size, pool_ceil_mode)[-1]

    @property
    def base_name(self) -> str:
        """The stock timm model of the backbone (its stock-weight source and its stock comparison)."""
        return self.spec.base

    def with_strides(self, strides: Union[str, Tuple[int, ...]]) -> 'ArchSpec':
        return replace(self, strides=strides)

    def model_kwargs(self) -> Dict[str, object]:
        """Keyword arguments of the backbone's generic entrypoint."""
        kwargs = dict(pool=str(self.pool), strides=self.digits)
        if self.prepool is not None:
            kwargs.update(prepool=str(self.prepool), prepool_stride=self.prepool_stride)
        return kwargs

    @classmethod
    def from_seed(cls, seed: str) -> 'ArchSpec':
        """Parse ``[prepool-POOL-S-][dy]BACKBONE-POOL-STRIDES``."""
        if not isinstance(seed, str):
            raise ValueError(f'Architecture string must be a str, got {seed!r}.')
        tokens = seed.lower().split('-')
        prepool = prepool_stride = None
        if len(tokens) == 6 and tokens[0] != 'prepool':
            raise ValueError(f"Malformed architecture string '{seed}': a 6-token string starts with 'prepool' "
                             f"(prepool-POOL-S-BACKBONE-POOL-STRIDES), got '{tokens[0]}'.")
        if tokens[0] == 'prepool':
            if len(tokens) != 6:
                raise ValueError(f"Malformed architecture string '{seed}': expected "
                                 f"prepool-POOL-S-BACKBONE-POOL-STRIDES (6 tokens), got {len(tokens)}.")
            prepool = _parse_pool(tokens[1], seed, 'pre-pool')
            prepool_stride = _parse_prepool_stride(tokens[2], seed)
            tokens = tokens[3:]
        elif len(tokens) != 3:
            raise ValueError(f"Malformed architecture string '{seed}': expected [prepool-POOL-S-]BACKBONE-POOL-STRIDES "
                             f"(3 or 6 '-'-separated tokens), got {len(tokens)}.")
        backbone, pool, strides = tokens
        dynamic = backbone.startswith('dy')
        name = backbone[2:] if dynamic else backbone
        if name not in BACKBONES:
            raise ValueError(f"Unknown backbone '{backbone}' in '{seed}'. Valid backbones: {_choices(BACKBONES)} "
                             "(optionally prefixed with 'dy').")
        return cls(name, _parse_pool(pool, seed), _parse_strides(strides, BACKBONES[name], seed), dynamic,
                   prepool, prepool_stride)

    @classmethod
    def from_timm_name(cls, name: str) -> 'ArchSpec':
        """Parse ``[prepool_POOL_S_][dy]PREFIX_POOL_STRIDES``."""
        if not isinstance(name, str):
            raise ValueError(f'Model name must be a str, got {name!r}.')
        lname = name.lower()
        prepool = prepool_stride = None
        if lname.startswith('prepool_'):
            tokens = lname.split('_')
            idx = next((i for i, t in enumerate(tokens[1:], 1) if t.isdigit()), None)
            if idx is None or idx == 1:
                raise ValueError(f"Malformed model name '{name}': expected prepool_POOL_S_PREFIX_POOL_STRIDES.")
            start = next((i for i in range(1, idx) if _backbone_prefix('_'.join(tokens[i:])) is not None), None)
            if start is not None:
                raise ValueError(f"Malformed model name '{name}': no pre-pool stride S after the pre-pool "
                                 f"'{'_'.join(tokens[1:start])}' (expected prepool_POOL_S_PREFIX_POOL_STRIDES).")
            prepool = _parse_pool('_'.join(tokens[1:idx]), name, 'pre-pool')
            prepool_stride = _parse_prepool_stride(tokens[idx], name)
            lname = '_'.join(tokens[idx + 1:])
        prefix = _backbone_prefix(lname)
        if prefix is None:
            tokens = lname.split('_')
            end = next((i for i, t in enumerate(tokens[1:], 1) if t in _POOL_HEADS), len(tokens))
            raise ValueError(f"Unknown backbone '{'_'.join(tokens[:end])}' in model name '{name}'. Valid prefixes: "
                             f"{_choices(_BY_PREFIX)} (optionally prefixed with 'dy'), followed by _POOL_STRIDES.")
        dynamic = lname.startswith('dy')
        rest = lname[2:] if dynamic else lname
        pool, _, strides = rest[len(prefix) + 1:].rpartition('_')
        backbone = _BY_PREFIX[prefix]
        if not pool:
            raise ValueError(f"Malformed model name '{name}': expected {prefix}_POOL_STRIDES.")
        return cls(backbone.seed, _parse_pool(pool, name), _parse_strides(strides, backbone, name), dynamic,
                   prepool, prepool_stride)

    @classmethod
    def parse(cls, arch: str) -> 'ArchSpec':
        """Parse either spelling: seed strings contain '-', timm names do not."""
        if isinstance(arch, str) and '-' in arch:
            return cls.from_seed(arch)
        return cls.from_timm_name(arch)
