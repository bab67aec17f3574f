"""MAC counting, checked against the closed form of each layer."""
import timm
from torch import nn

from timm_nlp.layers import create_pool2d
from timm_nlp.profiler import count_macs


def test_conv_and_linear_macs():
    assert count_macs(nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 16, 16)) == 8 * 8 * 8 * 3 * 9
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2)) == 60


def test_nlp_macs_include_attention():
    C, H, W = 32, 12, 10
    N, D = H * W, 32  # p = 1, ratio 1
    expected = (C * D * N          # patch embedding
                + 3 * D * D * N    # q, k, v
                + 2 * N * N * D    # q k^T and attn v over all heads
                + D * D * N        # output projection
                + D * C * N)       # restore
    assert count_macs(create_pool2d('nlp_headfix2', C, 2), (C, H, W)) == expected
    # reduced, p = 4 (reduction 8): tokens on a 3 x 3 grid, restore on the token grid in eval
    pool = create_pool2d('nlp_headfix2_nowin_reduced', C, 2, reduction=8)
    n, d = 9, 8
    assert count_macs(pool, (C, H, W)) == C * d * 16 * n + 3 * d * d * n + 2 * n * n * d + d * d * n + d * C * n
    # deformable: the deformable conv counts as a conv, plus its offset conv (2 p^2 outputs)
    assert count_macs(create_pool2d('dfmnlp_headfix2', C, 2), (C, H, W)) == expected + 2 * C * N


def test_stock_resnet18_macs_and_model_is_untouched():
    model = timm.create_model('resnet18')
    assert 1.80e9 < count_macs(model) < 1.83e9  # 1.81 GMACs, the published figure
    assert next(model.parameters()).device.type == 'cpu'
    pooled = timm.create_model('resnet18_nlp_headfix2_1222', device='meta')
    assert 3.3 < count_macs(pooled) / count_macs(model) < 3.5
