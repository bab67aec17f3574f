"""Detection: torchvision detectors on pooled backbones, COCO mAP, strides, MMDetection registration."""
import json
import math
import re
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
BUILDERS = dict(fasterrcnn=fasterrcnn, retinanet=retinanet, ssd=ssd)
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
    # SSD's many boxes on a backbone without zero-init last BNs (the paper's) overshoot at the others' lr
    opt = torch.optim.SGD(model.parameters(), lr=0.002 if detector == 'ssd' else 0.005, momentum=0.9)
    model.train()
    losses = []
    for _ in range(6):  # a few iterations on one batch: the loss must fall
        loss = _loss(model, images, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # falling: lower at the end, and down in all but at most one step, or down by a quarter (a loss that has reached
    # its plateau on this one batch rises a little under some thread schedules)
    steady = losses[-1] < losses[0] and sum(b < a for a, b in zip(losses, losses[1:])) >= len(losses) - 2
    assert steady or losses[-1] < 0.75 * losses[0], losses
    model.eval()
    if detector == 'fasterrcnn':  # keep every detection: a few steps from scratch score below the defaults
        model.roi_heads.score_thresh = 0.
    else:
        model.score_thresh = 0.
    with torch.no_grad():
        outputs = model(images)
    for out in outputs:
        boxes = out['boxes']
        assert len(boxes) > 0 and len(out['scores']) == len(out['labels']) == len(boxes)
        assert torch.isfinite(boxes).all() and (out['scores'] >= 0).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= SIZE).all() and (boxes[:, 3] <= SIZE).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        # RetinaNet's sigmoid head has no background: at threshold 0 its untrained class 0 shows too
        assert set(out['labels'].tolist()) <= ({0, 1, 2, 3} if detector == 'retinanet' else {1, 2, 3})


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
        levels = classifier.forward_intermediates(x.to('meta'), intermediates_only=True)
    assert len(feats) == len(model.backbone.strides)
    for f, s, i in zip(feats, model.backbone.strides, out_indices):
        # the classifier's feature maps: each side the input's over the stride, rounded down by a pooling layer
        # (floor mode) or up by a strided conv
        assert f.shape[-2:] == levels[i].shape[-2:]
        assert all(n // s <= m <= -(-n // s) for n, m in zip((96, 160), f.shape[-2:]))
    if detector == 'fasterrcnn':  # anchors follow the strides: 8 x stride per level
        assert [a[0] for a in model.rpn.anchor_generator.sizes] == [8 * s for s in model.backbone.strides]
    elif detector == 'retinanet':  # 4 x stride, three octave scales per level
        assert [list(a) for a in model.anchor_generator.sizes] == \
            [[4 * s, int(4 * s * 2 ** (1 / 3)), int(4 * s * 2 ** (2 / 3))] for s in model.backbone.strides]


def _anchor_steps(model, size):
    """The step in pixels between neighbouring anchor (default-box) centres of each level at a square input."""
    gen = model.rpn.anchor_generator if hasattr(model, 'rpn') else model.anchor_generator
    with torch.no_grad():
        images, _ = model.transform([torch.rand(3, size, size)])
        feats = list(model.backbone(images.tensors).values())
        anchors = gen(images, feats)[0]
    steps, start = [], 0
    for f, a in zip(feats, gen.num_anchors_per_location()):
        level = anchors[start:start + f.shape[-2] * f.shape[-1] * a]
        start += len(level)
        first = level.view(-1, a, 4)[:, 0]  # one anchor per location
        cx = ((first[:, 0] + first[:, 2]) / 2).round(decimals=2).unique()
        # a one-cell level: its centre sits half a step in
        steps.append(round(float(cx[1] - cx[0]) if len(cx) > 1 else 2 * float(cx[0]), 2))
    assert start == len(anchors)
    return steps


@pytest.mark.parametrize('detector,size', [('fasterrcnn', 800), ('retinanet', 800), ('ssd', 600)])
def test_anchor_steps_are_the_feature_strides(detector, size):
    """At 800 px (padded to 800, no multiple of 128 or 512) the deep levels of a 4222 backbone keep their stride."""
    kw = dict(size=size) if detector == 'ssd' else dict(min_size=size, max_size=size)
    model = BUILDERS[detector]('resnet18_lip_4222', num_classes=4, **kw)
    assert _anchor_steps(model.eval(), size) == model.backbone.strides


def test_non_power_of_two_strides_are_refused():
    with pytest.raises(ValueError, match=r'power-of-two feature strides.*\[6, 12, 24, 48, 96\]'):
        fasterrcnn('prepool-lip-6-resnet18-skip-1222', num_classes=4)


@pytest.mark.parametrize('name,out_indices,strides', [('resnet18_lip_1222', (1, 3), '[4, 16]'),
                                                      ('resnet18-lip-1242', (1, 2, 3, 4), '[4, 8, 32, 64]'),
                                                      ('resnet18-lip-1221', (1, 2, 3, 4), '[4, 8, 16, 16]')])
def test_fasterrcnn_refuses_strides_that_do_not_double(name, out_indices, strides):
    """RoIAlign assigns boxes to consecutive power-of-two levels: a gap would pool large boxes from no level."""
    with pytest.raises(ValueError, match=rf'double.*out_indices {re.escape(str(out_indices))} of {name} give '
                                         rf'strides {re.escape(strides)}'):
        fasterrcnn(name, num_classes=4, out_indices=out_indices)


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
    # COCO's -1: no ground-truth object of that size range (none is large), with or without results
    for metrics in (coco_map(gt, perfect), coco_map(gt, [])):
        assert metrics['mAP_large'] == metrics['AR_large'] == -1.0
    assert coco_map(gt, [])['mAP_small'] == coco_map(gt, [])['mAP_medium'] == 0.0
    with pytest.raises(ValueError, match='2 detector outputs for 1 image ids'):
        predictions_to_coco(out, [1])


def test_bad_out_indices_are_refused():
    from timm_nlp.detection import PooledBackbone, TimmNLPBackbone
    with pytest.raises(ValueError, match='out_indices is empty'):
        fasterrcnn('resnet18_lip_1222', out_indices=())
    # the features come in stage order, once each: reported channels and strides must follow them
    for out_indices, levels in (((4, 2), (4, 2)), ((2, 2, 3), (2, 2, 3)), ((-1, 4), (4, 4))):
        for build in (PooledBackbone, TimmNLPBackbone):
            with pytest.raises(ValueError, match=rf'out_indices {re.escape(str(out_indices))} \(levels '
                                                 rf'{re.escape(str(levels))}\) must increase, each level once'):
                build('resnet18_lip_1222', out_indices=out_indices)
    backbone = TimmNLPBackbone('resnet18_lip_1222', out_indices=(1, -1))
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert backbone.backbone.out_indices == (1, 4) and backbone.strides == [4, 32]
    assert [f.shape[1] for f in feats] == backbone.out_channels == [64, 512]


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
    # BatchNorm's num_batches_tracked counters may be absent, as for a strict load_state_dict; other tensors not
    state = {k: v for k, v in classifier.state_dict().items() if not k.endswith('num_batches_tracked')}
    model = fasterrcnn('resnet18_lip_2222', num_classes=4, weights=state)
    assert all(torch.equal(model.backbone.body.body.state_dict()['model.' + k], v) for k, v in state.items()
               if not k.startswith('fc.'))
    del state['layer1.0.bn1.running_mean']
    with pytest.raises(ValueError, match=r"missing \['layer1.0.bn1.running_mean'\]"):
        fasterrcnn('resnet18_lip_2222', num_classes=4, weights=state)


MMDET_CONFIGS = sorted((Path(__file__).resolve().parent.parent / 'train_scripts' / 'mmdet').glob('*.py'))


def test_mmdet_registration_with_mmengine_registry():
    mmengine = pytest.importorskip('mmengine', reason='mmengine (pure Python) is in the test extra')
    registry = register_mmdet(mmengine.Registry('model'))
    backbone = registry.build(dict(type='TimmNLPBackbone', name='resnet18-nlp_headfix2_nowin_reduced-1222',
                                   out_indices=(1, 2, 3, 4)))
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert isinstance(feats, tuple) and [f.shape[1] for f in feats] == backbone.out_channels == [64, 128, 256, 512]
    assert backbone.strides == [4, 8, 16, 32]


def test_mmdet_backbone_init_cfg_loads_the_checkpoint(tmp_path):
    """MMDetection's runner calls init_weights(); init_cfg=Pretrained loads through the safe, strict loader."""
    from timm_nlp.checkpoint import save_weights
    from timm_nlp.detection import TimmNLPBackbone
    torch.manual_seed(0)
    classifier = timm_nlp.create_model('resnet18_lip_1222', num_classes=10)
    save_weights(str(tmp_path / 'cls.safetensors'), classifier.state_dict())
    save_weights(str(tmp_path / 'det.safetensors'), {'backbone.' + k: v for k, v in classifier.state_dict().items()})
    for path, prefix in (('cls', None), ('det', 'backbone')):
        backbone = TimmNLPBackbone('resnet18_lip_1222', out_indices=(1, 2),
                                   init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / f'{path}.safetensors'),
                                                 prefix=prefix))
        own = backbone.backbone.body.model.state_dict()
        assert not torch.equal(own['layer1.0.conv1.weight'], classifier.state_dict()['layer1.0.conv1.weight'])
        backbone.init_weights()
        own = backbone.backbone.body.model.state_dict()
        assert own and all(torch.equal(v, classifier.state_dict()[k]) for k, v in own.items())
    other = timm.create_model('resnet50')
    save_weights(str(tmp_path / 'r50.safetensors'), other.state_dict())
    backbone = TimmNLPBackbone('resnet18_lip_1222', init_cfg=dict(type='Pretrained',
                                                                  checkpoint=str(tmp_path / 'r50.safetensors')))
    with pytest.raises(ValueError, match='Classification weights do not match resnet18_lip_1222'):
        backbone.init_weights()
    with pytest.raises(ValueError, match="supports only init_cfg=dict\\(type='Pretrained'"):
        TimmNLPBackbone('resnet18_lip_1222', init_cfg=dict(type='Kaiming', layer='Conv2d'))


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
        assert tuple(neck['out_channels'][:len(neck['in_channels'])]) == tuple(neck['in_channels'])
        gen, size = head['anchor_generator'], cfg['input_size']
        assert gen['input_size'] == size
        with torch.no_grad():
            sizes = [f.shape[-1] for f in backbone.eval()(torch.zeros(1, 3, size, size))]
        last_kernel = neck.get('last_kernel_size', 3)
        for i, (s, p) in enumerate(zip(neck['level_strides'], neck['level_paddings'])):  # SSDNeck's extra levels
            k = last_kernel if i == len(neck['level_strides']) - 1 else 3
            assert sizes[-1] + 2 * p >= k, f'extra level {i}: a {k}x{k} conv on a {sizes[-1]}x{sizes[-1]} map'
            sizes.append((sizes[-1] + 2 * p - k) // s + 1)
        levels = len(neck['out_channels'])
        assert len(sizes) == levels == len(head['in_channels']) == len(gen['strides']) == len(gen['ratios'])
        assert list(head['in_channels']) == list(neck['out_channels'])
        assert gen['strides'][:len(backbone.strides)] == backbone.strides
        # every level's anchor grid tiles the input: as many cells as the map has (a pooled level rounds down)
        assert all(size // s <= n <= math.ceil(size / s) for s, n in zip(gen['strides'], sizes)), (gen['strides'],
                                                                                                     sizes)
    else:  # YOLOv3: deepest level first
        assert neck['in_channels'] == backbone.out_channels[::-1]
        assert head['featmap_strides'] == backbone.strides[::-1] == head['anchor_generator']['strides']


def _train_coco():
    sys.path.insert(0, str(REPO / 'train_scripts'))
    try:
        import train_coco
    finally:
        sys.path.pop(0)
    return train_coco


def test_coco_training_drops_crowd_annotations(tmp_path):
    from timm_nlp.detection.shapes import write_coco
    train_coco = _train_coco()
    coco = write_coco(str(tmp_path), 'train', 2, size=64, seed=0)
    crowd = dict(image_id=1, category_id=1, iscrowd=1, bbox=[0, 0, 60, 60], area=3600,
                 segmentation=dict(counts=[0, 4096], size=[64, 64]))
    coco['annotations'] += [dict(crowd, id=99), dict(crowd, id=100, image_id=2)]
    (tmp_path / 'annotations' / 'instances_train.json').write_text(json.dumps(coco))
    ds = train_coco._dataset(str(tmp_path), 'train', train=True)
    for i, image_id in enumerate((1, 2)):
        _, target = ds[i]
        own = [a for a in coco['annotations'] if a['image_id'] == image_id and not a['iscrowd']]
        assert set(target) == {'boxes', 'labels', 'image_id'}
        assert len(target['boxes']) == len(own) and sorted(target['labels'].tolist()) == \
            sorted(a['category_id'] for a in own)


def test_coco_training_script_end_to_end(tmp_path):
    from timm_nlp.detection.shapes import write_coco
    data = tmp_path / 'coco'
    write_coco(str(data), 'train', 6, size=96, seed=0)
    val = write_coco(str(data), 'val', 4, size=96, seed=1)
    proc = subprocess.run([sys.executable, str(REPO / 'train_scripts' / 'train_coco.py'), '--data-dir', str(data),
                           '--train-split', 'train', '--val-split', 'val', '--detector', 'retinanet',
                           '--backbone', 'resnet18_lip_2222', '--epochs', '3', '--batch-size', '2', '--min-size', '96',
                           '--max-size', '96', '--workers', '0', '--lr', '0.01', '--score-thresh', '0',
                           '--output', str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / 'out' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1, 2]
    assert all(0. <= r['mAP'] <= 1. and math.isfinite(r['loss']) for r in records)
    assert records[-1]['loss'] < records[0]['loss'], [r['loss'] for r in records]  # it trains
    assert (tmp_path / 'out' / 'detector.safetensors').is_file()
    # every validation image has detections (score threshold 0), gathered under its own id and a known class
    predictions = json.loads((tmp_path / 'out' / 'predictions.json').read_text())
    assert len(predictions) == records[-1]['detections'] > 0
    assert {p['image_id'] for p in predictions} == {i['id'] for i in val['images']}
    assert {p['category_id'] for p in predictions} <= {c['id'] for c in val['categories']}
    assert all(p['bbox'][2] >= 0 and p['bbox'][3] >= 0 and 0. <= p['score'] <= 1. for p in predictions)
    assert coco_map(val, predictions)['mAP'] == pytest.approx(records[-1]['mAP'])


def _tiny_coco_args(tmp_path):
    """Two 64 px training images with category ids 1..3, one validation image; 1 epoch of RetinaNet."""
    from timm_nlp.detection.shapes import write_coco
    data = tmp_path / 'coco'
    train = write_coco(str(data), 'train', 2, size=64, seed=0)
    assert max(a['category_id'] for a in train['annotations']) == 3
    write_coco(str(data), 'val', 1, size=64, seed=1)
    return ['--data-dir', str(data), '--train-split', 'train', '--val-split', 'val', '--detector', 'retinanet',
            '--backbone', 'resnet18_lip_2222', '--epochs', '1', '--batch-size', '2', '--min-size', '64',
            '--max-size', '64', '--workers', '0', '--output', str(tmp_path / 'out')]


@pytest.mark.parametrize('extra,match', [
    (['--batch-size', '4'], r'2 training images with boxes over 1 process\(es\) give 2 per process, fewer than '
                            r'--batch-size 4'),
    (['--num-classes', '3'], r'--num-classes 3 is too small for category id 3 .* use at least 4'),
    (['--epochs', '0'], r'--epochs >= 1.*got --epochs 0,'),
    (['--lr', '0'], r'--lr > 0.*--lr 0.0,'),
    (['--warmup-iters', '-1'], r'--warmup-iters >= 0.*--warmup-iters -1\.'),
], ids=['batch-over-images', 'num-classes', 'epochs', 'lr', 'warmup'])
def test_coco_training_refuses_bad_settings(tmp_path, monkeypatch, extra, match):
    """No full batch (nothing would train), too few classes for the labels, or a setting a preset would override."""
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with pytest.raises(ValueError, match=match):
        _train_coco().main(_tiny_coco_args(tmp_path) + extra)
    assert not (tmp_path / 'out' / 'detector.safetensors').exists()


def test_coco_training_without_warmup(tmp_path, monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    _train_coco().main(_tiny_coco_args(tmp_path) + ['--warmup-iters', '0', '--lr', '0.01'])
    records = [json.loads(line) for line in (tmp_path / 'out' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0] and math.isfinite(records[0]['loss']) and records[0]['loss'] > 0
