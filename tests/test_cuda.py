"""CUDA: every pooling method and a pooled model of each backbone family against the same module on the CPU (fp32,
fp64, bf16 autocast, channels_last; forward and backward), the fused attention kernels (no materialised N x N map),
torch.compile of a pool and of whole models (forward and backward) and the trainer.

Skipped without a CUDA device: CI has none. The formulas are the same on both devices and the CPU suite checks them
against the plain formulation (test_layers.py, test_models.py, test_export.py, test_train.py); the CPU counterparts of
the concerns checked here: channels_last (test_models.py::test_channels_last_model_matches_contiguous,
test_layers.py::test_batch1_channels_last_bf16), bf16 autocast (test_layers.py: test_batch1_channels_last_bf16,
test_gaussian_pool_low_precision_keeps_window_std, test_deform_conv_bf16), torch.compile (test_export.py), the
dynamic convolutions' grouped form (test_layers.py::test_dynamic_conv_batch_agnostic_form_is_the_same_function).

``TIMM_NLP_CUDA_TESTS_ON_CPU=1`` runs this file on the CPU instead (the device is then the CPU itself): a dry run of
the test code for ``benchmarks/gpu_check.sh``, which compares the CPU with itself and so says nothing about CUDA;
the tests that measure CUDA memory stay skipped.
"""
import contextlib
import copy
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from reference import PlainNlpPool, randomize_model
from test_layers import LAYERS, _assert_grads_close
from test_train import FAST
import timm_nlp
from timm_nlp.checkpoint import load_training_checkpoint
from timm_nlp.layers import SelfAttentiveImportance, create_pool2d

HAS_CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get('TIMM_NLP_CUDA_TESTS_ON_CPU') == '1' and not HAS_CUDA
DEVICE = 'cuda' if HAS_CUDA else 'cpu'
pytestmark = pytest.mark.skipif(
    not HAS_CUDA and not DRY_RUN,
    reason='needs a CUDA device; the CPU suite checks the same formulas (test_layers, test_models, test_export, '
           'test_train); TIMM_NLP_CUDA_TESTS_ON_CPU=1 dry-runs this file on the CPU')
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason='measures CUDA memory: no dry run on the CPU')
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
REPO = Path(__file__).resolve().parent.parent
Grads = Dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 matrix products and convolutions in full precision (no TF32), so CUDA can be held to CPU tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def same_noise(seed: int = 0) -> Iterator[List[torch.Size]]:
    """``torch.randn_like`` (Gaussian pooling's training noise) drawn on the CPU from a generator seeded with
    ``seed`` and moved to the tensor's device, so that a CPU and a CUDA run draw the same noise; yields the shapes
    drawn."""
    gen = torch.Generator().manual_seed(seed)
    drawn: List[torch.Size] = []
    original = torch.randn_like

    def randn_like(t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        drawn.append(t.shape)
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    torch.randn_like = randn_like
    try:
        yield drawn
    finally:
        torch.randn_like = original


def _fwd_bwd(module: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Grads]:
    """Output, input gradient and parameter gradients of ``(module(x) * cot).sum()``, all on the CPU."""
    module.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    with same_noise():
        y = module(xi)
    (y * cot).sum().backward()
    return y.detach().cpu(), xi.grad.cpu(), {n: p.grad.cpu() for n, p in module.named_parameters()
                                             if p.grad is not None}


def _loss_and_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: bool = False,
                    ) -> Tuple[float, torch.Tensor, Grads]:
    """Cross-entropy of ``model`` on ``x`` (bf16 autocast on the input's device if ``autocast``; the same Gaussian
    noise on every device), the input gradient and every parameter gradient, on the CPU."""
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    with same_noise(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = nn.functional.cross_entropy(model(xi), target)
    loss.backward()
    return loss.item(), xi.grad.cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}


def _head_dims(model: nn.Module) -> List[int]:
    """The head dimension of every self-attention in ``model``, in module order."""
    return [m.embed_dim // m.attn.num_heads for m in model.modules() if isinstance(m, SelfAttentiveImportance)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms) of two tensors, in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('name,train', [(n, t) for n in LAYERS for t in (False, True)])
def test_pool_on_cuda_matches_cpu(name, train, layout):
    """Output and every gradient of each method on CUDA, in either memory format, equal the CPU's (training-mode
    Gaussian pooling with the same noise on both); attention may only run fused kernels."""
    torch.manual_seed(0)
    nonlocal_ = name.split('_')[0] in ('nlp', 'dfmnlp', 'mixp', 'dfmixp')
    cpu = create_pool2d(name, 32, 2, **(dict(patch_size=3) if nonlocal_ else {}))  # tokens of uneven pixel counts
    randomize_model(cpu)
    gpu = copy.deepcopy(cpu).to(DEVICE).to(memory_format=layout)
    cpu.train(train), gpu.train(train)
    x, cot = torch.randn(2, 32, 21, 18), torch.randn(2, 32, 21 // 2, 18 // 2)  # floor mode
    y_ref, gx_ref, gp_ref = _fwd_bwd(cpu, x, cot)
    with sdpa_kernel(FUSED):  # a fall-back to the math kernel (the N x N map) raises instead of passing silently
        y, gx, gp = _fwd_bwd(gpu, x.to(DEVICE).to(memory_format=layout), cot.to(DEVICE))
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    _assert_grads_close(gp, gp_ref, 5e-4, name)
    if train:  # the BN running statistics moved the same way
        for (n, b), b_ref in zip(gpu.named_buffers(), cpu.buffers()):
            torch.testing.assert_close(b.cpu(), b_ref, atol=1e-5, rtol=1e-5, msg=n)


@needs_cuda
def test_bf16_attention_is_fused_and_lean():
    """At a ResNet stage-1 size the plain formulation materialises a (B, heads, N, N) map; ours must not: its
    fwd+bwd peak is a fraction of the plain one, and its bf16 result follows the fp32 one."""
    torch.manual_seed(0)
    ours = create_pool2d('nlp_headfix2', 64, 2).cuda().train()
    plain = PlainNlpPool(ours)
    x = torch.randn(8, 64, 56, 56, device='cuda')

    def peak(module, kernels):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        xi = x.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16), kernels:
            y = module(xi)
            y.float().square().mean().backward()
        torch.cuda.synchronize()
        return y.float().detach(), torch.cuda.max_memory_allocated() - base

    y_ours, mem_ours = peak(ours, sdpa_kernel(FUSED))
    _, mem_plain = peak(plain, contextlib.nullcontext())  # nn.MultiheadAttention with its attention weights
    attn_map = 8 * 2 * (56 * 56) ** 2 * 2  # one bf16 (B, heads, N, N) map
    assert mem_plain > attn_map > mem_ours, (mem_plain, attn_map, mem_ours)
    assert mem_plain > 4 * mem_ours, (mem_plain, mem_ours)
    with torch.no_grad():
        y32 = ours(x)
    assert (y_ours - y32).abs().max() <= 0.05 * y32.abs().max(), 'bf16 autocast drifted from fp32'


# one model per backbone family (ResNet-18/50, the in-stage placement b1, MobileNetV2 and its b0 placement, dynamic
# convolutions, stem pre-pools) and per pooling family (nlp, nowin, reduced, deformable, mixed, lip, Gaussian)
MODELS = ['resnet18_nlp_headfix2_1222', 'resnet18_nlp_headfix2_nowin_reduced_2222', 'resnet50b1_dfmixp_2222',
          'mobilenetv2_mixp_4222121', 'mobilenetv2b0_gaussian_pool_2222121', 'dyresnet18_lip_2222',
          'dymobilenetv2_dfmnlp_reduced_2222121', 'prepool_nlp_headfix2_4_resnet18_nlp_headfix2_1222']


@pytest.mark.parametrize('name', MODELS)
def test_model_on_cuda_matches_cpu(name):
    """On CUDA against the CPU: eval logits in fp32; train-mode loss and every gradient in fp64 (in fp32, train-mode
    gradients of a random-init model differ by ~0.5% between two correct kernels:
    test_models.py::test_channels_last_model_matches_contiguous); bf16 autocast in channels_last, forward and
    backward in eval mode (train-mode BN over a batch of 4 amplifies bf16 rounding beyond any useful tolerance), to
    bf16 tolerances; then a bf16, channels_last training step gives a finite loss and a finite gradient for every
    parameter."""
    torch.manual_seed(0)
    cpu = timm_nlp.create_model(name, num_classes=10)
    randomize_model(cpu)
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x, target = torch.randn(4, 3, 64, 64), torch.tensor([3, 7, 0, 9])
    with torch.no_grad():  # any SDPA kernel: test_attention_runs_fused_kernels checks which ones run
        ref = cpu.eval()(x)
        torch.testing.assert_close(gpu.eval()(x.to(DEVICE)).cpu(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)

    # fp64, train mode: the same function to rounding
    results = [_loss_and_grads(m.double().train(), x.double().to(dev), target.to(dev))
               for m, dev in ((cpu, 'cpu'), (gpu, DEVICE))]
    (loss_ref, gx_ref, grads_ref), (loss, gx, grads) = results
    assert abs(loss - loss_ref) <= 1e-10 * abs(loss_ref), (loss, loss_ref)
    assert _rel(gx, gx_ref) <= 1e-7, 'input gradient'
    _assert_grads_close(grads, grads_ref, 1e-7, name)

    # bf16 autocast, channels_last, eval mode, against the CPU's fp64. Tolerances: 2.5-3x the largest error of the
    # CPU's own bf16 autocast against fp64 over these models (logits 0.041, loss 0.016, gradients 0.079 of the largest
    # gradient, input gradient 0.27 in norm); a wrong kernel misses them by orders of magnitude
    loss_ref, gx_ref, grads_ref = _loss_and_grads(cpu.eval(), x.double(), target)
    gpu = gpu.float().eval().to(memory_format=torch.channels_last)
    x_cl = x.to(DEVICE).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        y_bf16 = gpu(x_cl).float().cpu()
    with torch.no_grad():
        ref = cpu(x.double())
    assert (y_bf16.double() - ref).abs().max() <= 0.1 * ref.abs().max(), 'bf16 logits'
    loss, gx, grads = _loss_and_grads(gpu, x_cl, target.to(DEVICE), autocast=True)
    assert abs(loss - loss_ref) <= 0.05 * abs(loss_ref), ('bf16 loss', loss, loss_ref)
    assert _rel(gx, gx_ref) <= 0.6, 'bf16 input gradient'
    _assert_grads_close({n: g.double() for n, g in grads.items()}, grads_ref, 0.2, f'{name} bf16')

    gpu.train().zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(gpu(x_cl), target.to(DEVICE))
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in gpu.named_parameters():
        if n in grads_ref:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f'{name}: bf16 training gradient of {n}'


# the paper's networks: every head dimension its self-attention layers have (ResNet: 16 to 256; MobileNetV2 by
# stage index: 2 to 8, headfix2 8 to 80)
FUSED_MODELS = ['resnet18_nlp_2222', 'resnet50_nlp_2222', 'resnet18_nlp_headfix2_4222', 'mobilenetv2_nlp_2222121',
                'mobilenetv2_nlp_headfix2_2222121', 'prepool_nlp_headfix2_4_resnet18_skip_1222']


@pytest.mark.parametrize('bf16', [False, True], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('name', FUSED_MODELS)
def test_attention_runs_fused_kernels(name, bf16):
    """Forward and backward of the paper's networks with only the fused SDPA kernels allowed (flash, memory-efficient,
    cuDNN), in fp32 and under bf16 autocast: a head dimension that no fused kernel takes (memory-efficient attention
    needs a multiple of 4 in fp32 and of 8 in bf16 on CUDA) would fall back to the math kernel, which materialises
    the (B, heads, N, N) map that the design rules out."""
    torch.manual_seed(0)
    model = timm_nlp.create_model(name, num_classes=10).to(DEVICE).train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    try:
        with sdpa_kernel(FUSED), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x).float().square().mean()
        loss.backward()
    except RuntimeError as e:
        pytest.fail(f'{name} ({"bf16" if bf16 else "fp32"}): no fused attention kernel for its head dimensions '
                    f'{_head_dims(model)}: {str(e).splitlines()[0]}')
    assert torch.isfinite(loss)


def test_trainer_learns_digits_on_cuda(tmp_path):
    """test_train.py::test_digits_training_learns's command (its batch, learning rate and size: at lr 0.1 the
    paper's networks diverge on the digits, on any device) on CUDA."""
    out = tmp_path / 'run'
    proc = subprocess.run([sys.executable, '-m', 'timm_nlp.cli', 'train', '--model', 'resnet18_nlp_headfix2_2222',
                           '--epochs', '3', '--output', str(out), *FAST, '--device', DEVICE],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    # 10 balanced classes: chance is 10%; the CPU run of the same command (test_train.py) passes the same bar
    assert [int(r['epoch']) for r in rows] == [0, 1, 2] and float(rows[-1]['eval_top1']) > 80., rows
    assert load_training_checkpoint(str(out / 'last.pth.tar'))['epoch'] == 2


def _compiled(module: nn.Module) -> Callable:
    torch._dynamo.reset()  # a fresh cache: never a silent eager fall-back after the recompile limit
    return torch.compile(module, fullgraph=True)  # fullgraph: no graph breaks either


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_compiled_pool_on_cuda_matches_eager(train):
    """torch.compile (inductor: Triton kernels on CUDA) of a mixed local x non-local pool: output and gradients as
    eager."""
    torch.manual_seed(0)
    eager = create_pool2d('mixp_headfix2', 64, 2, patch_size=2).to(DEVICE).train(train)
    randomize_model(eager)
    compiled = _compiled(copy.deepcopy(eager))
    x, cot = torch.randn(4, 64, 28, 28, device=DEVICE), torch.randn(4, 64, 14, 14, device=DEVICE)
    y_ref, gx_ref, gp_ref = _fwd_bwd(eager, x, cot)
    y, gx, gp = _fwd_bwd(compiled, x, cot)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    _assert_grads_close({n.replace('_orig_mod.', ''): g for n, g in gp.items()}, gp_ref, 5e-4, 'compiled')


# dynamic convolutions (their grouped form), a deformable embedding (torchvision's deform_conv2d) of 4x4 tokens, the
# fused attention, at the accuracy run's stride 4: the slowest test here (inductor compiles a forward and a backward
# graph: 3.5 minutes on 2 CPU cores; a MobileNetV2 took 15)
@pytest.mark.parametrize('name', ['dyresnet18_dfmnlp_reduced_4222'])
def test_compiled_model_on_cuda_matches_cpu(name):
    """A whole model compiled on CUDA (fp64, training mode, one graph): loss, input gradient and every parameter
    gradient equal the CPU's eager ones to fp64 rounding, and the BN running statistics moved the same way."""
    torch.manual_seed(0)
    cpu = randomize_model(timm_nlp.create_model(name, num_classes=10)).double().train()
    gpu = copy.deepcopy(cpu).to(DEVICE)
    x, target = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.tensor([3, 7, 0, 9])
    loss_ref, gx_ref, grads_ref = _loss_and_grads(cpu, x, target)
    loss, gx, grads = _loss_and_grads(_compiled(gpu), x.to(DEVICE), target.to(DEVICE))
    assert abs(loss - loss_ref) <= 1e-10 * abs(loss_ref), (loss, loss_ref)
    assert _rel(gx, gx_ref) <= 1e-7, 'input gradient'
    _assert_grads_close({n.replace('_orig_mod.', ''): g for n, g in grads.items()}, grads_ref, 1e-7, name)
    for (n, b), b_ref in zip(gpu.named_buffers(), cpu.buffers()):
        torch.testing.assert_close(b.cpu(), b_ref, atol=1e-9, rtol=1e-9, msg=n)
