"""Detection: torchvision detectors on pooled backbones, COCO mAP, strides, MMDetection registration."""
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_nlp
from timm_nlp.detection import coco_map, fasterrcnn, predictions_to_coco, register_mmdet, retinanet, ssd
from timm_nlp.detection.shapes import shapes_dataset

REPO = Path(__file__).resolve().parent.parent
SIZE = 128
DETECTORS = {
    'fasterrcnn': lambda name: fasterrcnn(name, num_classes=4, min_size=SIZE, max_size=SIZE),
    'retinanet': lambda name: retinanet(name, num_classes=4, min_size=SIZE, max_size=SIZE),
    'ssd': lambda name: ssd(name, num_classes=4, size=SIZE),
}
BACKBONES = ['resnet18_nlp_headfix2_1222', 'resnet18_nlp_headfix2_4222', 'resnet18_lip_1222', 'resnet18_lip_4222']


def _loss(model, images, targets):
    return sum(model(images, targets).values())


@pytest.mark.parametrize('backbone', BACKBONES)
@pytest.mark.parametrize('detector', list(DETECTORS))
def test_detector_trains_and_predicts(detector, backbone):
    torch.manual_seed(0)
    model = DETECTORS[detector](backbone)
    data = shapes_dataset(2, SIZE)
    images, targets = [d[0] for d in data], [d[1] for d in data]
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    model.train()
    losses = []
    for _ in range(6):  # a few iterations on one batch: the loss must fall
        loss = _loss(model, images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # falling: lower at the end, and down in all but at most one step
    assert losses[-1] < losses[0] and sum(b < a for a, b in zip(losses, losses[1:])) >= len(losses) - 2, losses
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for out in outputs:
        boxes = out['boxes']
        assert torch.isfinite(boxes).all() and (out['scores'] >= 0).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= SIZE).all() and (boxes[:, 3] <= SIZE).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert set(out['labels'].tolist()) <= {1, 2, 3}


@pytest.mark.parametrize('detector,out_indices', [('fasterrcnn', (1, 2, 3, 4)), ('retinanet', (2, 3, 4)),
                                                  ('ssd', (2, 3, 4))])
@pytest.mark.parametrize('backbone', ['resnet18_nlp_headfix2_4222', 'mobilenetv2_lip_2222121',
                                      'prepool-maxp-4-resnet18_v2-lip-2222'])
def test_reported_strides_are_measured(detector, out_indices, backbone):
    model = DETECTORS[detector](backbone).eval()
    classifier = timm_nlp.create_model(backbone, device='meta')
    assert model.backbone.body.strides == [classifier.feature_info[i]['reduction'] for i in out_indices]
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        feats = list(model.backbone(x).values())
    assert len(feats) == len(model.backbone.strides)
    for f, s in zip(feats, model.backbone.strides):
        assert f.shape[-2:] == (math.ceil(96 / s), math.ceil(160 / s)), (s, f.shape)
    if detector == 'fasterrcnn':  # anchors follow the strides: 8 x stride per level
        assert [a[0] for a in model.rpn.anchor_generator.sizes] == [8 * s for s in model.backbone.strides]


def test_non_power_of_two_strides_are_refused():
    with pytest.raises(ValueError, match=r'power-of-two feature strides.*\[6, 12, 24, 48, 96\]'):
        fasterrcnn('prepool-lip-6-resnet18-skip-1222', num_classes=4)


def _gt(boxes_per_image):
    images = [dict(id=i + 1, width=100, height=100) for i in range(len(boxes_per_image))]
    anns = [dict(id=k + 1, image_id=i + 1, category_id=c, bbox=b, area=b[2] * b[3], iscrowd=0)
            for i, objs in enumerate(boxes_per_image) for k, (c, b) in enumerate(objs)]
    for k, a in enumerate(anns):
        a['id'] = k + 1
    return dict(images=images, annotations=anns, categories=[dict(id=1, name='a'), dict(id=2, name='b')])


def test_coco_map_perfect_and_wrong():
    objs = [[(1, [10, 10, 30, 40]), (2, [50, 50, 20, 20])], [(1, [5, 60, 40, 30])]]
    gt = _gt(objs)
    perfect = [dict(image_id=i + 1, category_id=c, bbox=b, score=0.9) for i, o in enumerate(objs) for c, b in o]
    assert coco_map(gt, perfect)['mAP'] == pytest.approx(1.0)
    # wrong places and wrong classes
    wrong = [dict(image_id=1, category_id=1, bbox=[70, 0, 20, 20], score=0.9),
             dict(image_id=2, category_id=2, bbox=[5, 60, 40, 30], score=0.9)]
    assert coco_map(gt, wrong)['mAP'] == 0.0 and coco_map(gt, [])['mAP'] == 0.0
    # torchvision outputs (xyxy) convert to COCO results (xywh)
    out = [dict(boxes=torch.tensor([[10., 10., 40., 50.], [50., 50., 70., 70.]]), scores=torch.tensor([.9, .8]),
                labels=torch.tensor([1, 2])), dict(boxes=torch.tensor([[5., 60., 45., 90.]]),
                                                   scores=torch.tensor([.7]), labels=torch.tensor([1]))]
    assert coco_map(gt, predictions_to_coco(out, [1, 2]))['mAP'] == pytest.approx(1.0)


def test_classification_weights_transfer_to_the_detector():
    torch.manual_seed(0)
    classifier = timm.create_model('resnet18_lip_2222', num_classes=10)
    model = fasterrcnn('resnet18_lip_2222', num_classes=4, weights=classifier.state_dict())
    body = model.backbone.body.body
    for k, v in classifier.state_dict().items():
        if not k.startswith('fc.'):
            assert torch.equal(body.state_dict()['model.' + k], v), k
    with pytest.raises(ValueError, match='Classification weights do not match resnet18_lip_2222'):
        fasterrcnn('resnet18_lip_2222', weights=timm.create_model('resnet50').state_dict())


MMDET_CONFIGS = sorted((Path(__file__).resolve().parent.parent / 'train_scripts' / 'mmdet').glob('*.py'))


def test_mmdet_registration_with_mmengine_registry():
    mmengine = pytest.importorskip('mmengine', reason='mmengine (pure Python) is in the test extra')
    registry = register_mmdet(mmengine.Registry('model'))
    backbone = registry.build(dict(type='TimmNLPBackbone', name='resnet18-nlp_headfix2_nowin_reduced-1222',
                                   out_indices=(1, 2, 3, 4)))
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert isinstance(feats, tuple) and [f.shape[1] for f in feats] == backbone.out_channels == [64, 128, 256, 512]
    assert backbone.strides == [4, 8, 16, 32]


@pytest.mark.parametrize('path', MMDET_CONFIGS, ids=lambda p: p.name)
def test_mmdet_configs_match_their_backbone(path):
    """MMDetection itself cannot be installed next to this torch (see README); the configs are checked
    against the backbone they build: registration import, channels and strides of every level."""
    mmengine = pytest.importorskip('mmengine')
    cfg = runpy.run_path(str(path))
    assert cfg['custom_imports']['imports'] == ['timm_nlp.detection']
    model = cfg['model']
    backbone = register_mmdet(mmengine.Registry('model')).build(model['backbone'])
    neck, head = model['neck'], model.get('bbox_head') or model['rpn_head']
    if neck['type'] == 'FPN':
        assert neck['in_channels'] == backbone.out_channels
        assert model['rpn_head']['anchor_generator']['strides'][:-1] == backbone.strides
        assert model['roi_head']['bbox_roi_extractor']['featmap_strides'] == backbone.strides
    elif neck['type'] == 'SSDNeck':
        assert list(neck['in_channels']) == backbone.out_channels
        assert head['anchor_generator']['strides'][:2] == backbone.strides
    else:  # YOLOv3: deepest level first
        assert neck['in_channels'] == backbone.out_channels[::-1]
        assert head['featmap_strides'] == backbone.strides[::-1] == head['anchor_generator']['strides']


def test_coco_training_script_end_to_end(tmp_path):
    from timm_nlp.detection.shapes import write_coco
    data = tmp_path / 'coco'
    write_coco(str(data), 'train', 6, size=96, seed=0)
    write_coco(str(data), 'val', 4, size=96, seed=1)
    proc = subprocess.run([sys.executable, str(REPO / 'train_scripts' / 'train_coco.py'), '--data-dir', str(data),
                           '--train-split', 'train', '--val-split', 'val', '--detector', 'retinanet',
                           '--backbone', 'resnet18_lip_2222', '--epochs', '2', '--batch-size', '2', '--min-size', '96',
                           '--max-size', '96', '--workers', '0', '--output', str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / 'out' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1]
    assert all(0. <= r['mAP'] <= 1. and math.isfinite(r['loss']) for r in records)
    assert (tmp_path / 'out' / 'detector.safetensors').is_file()
