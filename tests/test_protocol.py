"""The layer protocol (timm_nlp.layers.protocol): a pooling method defined here, outside the package, runs through the
profiler and patch-based execution without either knowing it; the package's structure (no import cycles, timm-shaped
entrypoints, old checkpoints' keys)."""
import ast
import inspect
from pathlib import Path
from typing import List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_nlp
from timm_nlp.layers import PatchSupport, PoolLayer
from timm_nlp.models import checkpoint_filter_fn
from timm_nlp.patching import patched_macs, patched_profile
from timm_nlp.profiler import activation_profile, count_macs

PACKAGE = Path(timm_nlp.__file__).parent


class GatedAvgPool(PoolLayer):
    """A toy pooling method: average pooling scaled by a per-channel gate of the whole map's mean,
    ``avgpool(x) * sigmoid(a * mean(x) + b)``; it holds a map of its input's size while it pools (to be counted), and
    runs patch by patch in two passes (the per-channel sums, then the gate)."""

    def __init__(self, channels: int, stride: int = 2, mode: str = 'two-pass'):
        super().__init__()
        self.stride, self.ceil_mode, self.mode = stride, False, mode
        self.a = nn.Parameter(torch.linspace(5., 15., channels))
        self.b = nn.Parameter(torch.linspace(-1., 1., channels))

    def _gate(self, mean: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.a[:, None, None] * mean + self.b[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool_patch(x, self._gate(x.mean((2, 3), keepdim=True)), (0, 0))

    def operand_numel(self, x: torch.Tensor, out: torch.Tensor) -> int:
        return x.numel()

    def patch_support(self) -> PatchSupport:
        if self.mode == 'whole-map':
            return PatchSupport.whole_map('the toy refuses')
        return PatchSupport.local() if self.mode == 'local' else PatchSupport.two_pass('gated')

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum((2, 3), keepdim=True)

    def global_state(self, parts: List[Tuple[Tuple[int, int], torch.Tensor]], in_size: Tuple[int, int]
                     ) -> torch.Tensor:
        return self._gate(torch.stack([p for _, p in parts]).sum(0) / (in_size[0] * in_size[1]))

    def pool_patch(self, x: torch.Tensor, state: torch.Tensor, origin: Tuple[int, int]) -> torch.Tensor:
        return F.avg_pool2d(x, self.stride) * state

    def two_pass_numel(self, in_size: Tuple[int, int]) -> Tuple[int, int]:
        return self.a.numel(), self.a.numel()


def _toy_resnet(mode: str = 'two-pass') -> nn.Module:
    model = timm.create_model('resnet18', num_classes=5)
    model.maxpool = GatedAvgPool(64, 2, mode)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval().double()


def test_a_new_pooling_method_runs_patch_by_patch_without_changes():
    model = _toy_resnet()
    x = torch.randn(2, 3, 100, 92, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    patched = timm_nlp.patch_based(model, 3, 'layer1')
    assert [tp.name for tp in patched.plan((3, 100, 92)).two_pass] == ['maxpool']
    with torch.no_grad():
        ref, out = model(x), patched(x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-9 * ref.abs().max())
    # the same layer claiming to be local runs on each crop alone (its gate from the crop's mean): wrong outputs
    model.maxpool.mode = 'local'
    with torch.no_grad():
        feats = model.forward_features(x)
        wrong = timm_nlp.patch_based(model, 3, 'layer1').forward_features(x)
    assert (wrong - feats).abs().max() > 1e-3 * feats.abs().max()


def test_a_new_pooling_method_is_counted_and_refused_as_it_says():
    model = _toy_resnet()
    steps = {s.name: s for s in activation_profile(model, (3, 64, 64), dtype='int8', accounting='mcunet').layers}
    assert steps['maxpool'].operand_bytes == 64 * 32 * 32  # what the layer says it holds: its input's size
    assert steps['maxpool'].kind == 'GatedAvgPool'
    patched = {s.name: s for s in patched_profile(model, (3, 96, 96), 3, 'layer1', dtype='int8').layers}
    assert patched['gated-pass:conv1'].held_bytes == 64  # the per-channel sums it assembles
    assert patched['patch:conv1'].held_bytes == 64 * 24 * 24 + 64  # the assembled layer1 output and the gate
    assert not any(name.startswith('attention:') for name in patched)  # no global step of its own
    # one patch: the whole map, plus the first pass's stem conv (7 x 7 x 3 -> 64 on 48 x 48)
    assert patched_macs(model, (3, 96, 96), 1, 'layer1') == count_macs(model, (3, 96, 96)) + 147 * 64 * 48 * 48
    with pytest.raises(ValueError, match=r"'maxpool' \(GatedAvgPool\) needs the whole map: the toy refuses"):
        timm_nlp.patch_based(_toy_resnet('whole-map'), 3, 'layer1')


def test_weights_of_earlier_versions_load():
    """Checkpoints written before the non-local importance was named ``non_local`` (keys ``...pool.nlp.*``)."""
    model = timm_nlp.create_model('prepool-nlp_headfix2-4-resnet18-nlp_headfix2_reduced-2222', num_classes=3)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    old = {k.replace('.non_local.', '.nlp.'): v for k, v in state.items()}
    assert sum('.nlp.' in k for k in old) > 20
    fresh = timm_nlp.create_model('prepool-nlp_headfix2-4-resnet18-nlp_headfix2_reduced-2222', num_classes=3)
    fresh.load_state_dict(old)  # strict
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    filtered = checkpoint_filter_fn(old, fresh)
    assert set(filtered) == set(state)


def test_entrypoints_are_shaped_as_timms():
    named = timm.models.model_entrypoint('resnet18_nlp_headfix2_2222')
    assert str(inspect.signature(named)).startswith('(pretrained: bool = False, **kwargs')
    assert named.__name__ == 'resnet18_nlp_headfix2_2222' and named.__module__ == 'timm_nlp.models.pooled_resnet'
    generic = timm.models.model_entrypoint('mobilenetv2_pooled')
    assert list(inspect.signature(generic).parameters) == [
        'pretrained', 'pool', 'strides', 'prepool', 'prepool_stride', 'kwargs']
    assert generic(pool='lip', strides='2222121').arch.seed == 'mobilenet_v2-lip-2222121'


def _imports(path: Path, module: str) -> List[str]:
    """The package modules ``module`` imports, anywhere in its file (function-local imports included)."""
    is_pkg = path.name == '__init__.py'
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = module if is_pkg else module.rpartition('.')[0]
            if node.level:
                base = '.'.join(base.split('.')[:len(base.split('.')) - node.level + 1])
                target = base + ('.' + node.module if node.module else '')
            else:
                target = node.module or ''
            out += [target + '.' + a.name for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_no_import_cycles():
    modules = {}
    for path in PACKAGE.rglob('*.py'):
        name = '.'.join(('timm_nlp',) + path.relative_to(PACKAGE).with_suffix('').parts)
        modules[name.removesuffix('.__init__')] = path
    # a package's __init__ re-exports its submodules: its edges into them are not dependencies of theirs
    graph = {m: {t for t in _imports(p, m) if t in modules and t != m
                 and not (p.name == '__init__.py' and t.startswith(m + '.'))} for m, p in modules.items()}
    state = {}

    def visit(m, path):
        state[m] = 'open'
        for t in sorted(graph[m]):
            if state.get(t) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 'done'
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert 'timm_nlp.profiler' not in graph['timm_nlp.layers.weighted_pool']  # layers ask nothing of their users
    assert 'timm_nlp.patching' not in graph['timm_nlp.profiler']
