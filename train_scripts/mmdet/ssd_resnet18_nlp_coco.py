# MMDetection 3.x: SSD300 on a pooled ResNet-18 (the paper's config form for the backbone).
#   python tools/train.py train_scripts/mmdet/ssd_resnet18_nlp_coco.py     (in an mmdet checkout)
# mmdet's ssd300 levels: the backbone's stride-8 and stride-16 maps (37x37, 18x18 at 300 px, levels 2 and 3 of
# the 1222 backbone: its pooling layers round down), then SSDNeck's extra levels 9x9, 5x5 (stride-2 convs), 3x3,
# 1x1 (unpadded 3x3 convs).
_base_ = [
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_2x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['timm_nlp.detection'], allow_failed_imports=False)
input_size = 300
data_preprocessor = dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                         bgr_to_rgb=True, pad_size_divisor=1)
model = dict(
    type='SingleStageDetector',
    data_preprocessor=data_preprocessor,
    backbone=dict(type='TimmNLPBackbone', name='resnet18-nlp_headfix2_nowin_reduced-1222', out_indices=(2, 3)),
    neck=dict(type='SSDNeck', in_channels=(128, 256), out_channels=(128, 256, 512, 256, 256, 256),
              level_strides=(2, 2, 1, 1), level_paddings=(1, 1, 0, 0), l2_norm_scale=20),
    bbox_head=dict(
        type='SSDHead', in_channels=(128, 256, 512, 256, 256, 256), num_classes=80,
        anchor_generator=dict(type='SSDAnchorGenerator', scale_major=False, input_size=input_size,
                              basesize_ratio_range=(0.15, 0.9), strides=[8, 16, 32, 64, 100, 300],
                              ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0], target_stds=[0.1, 0.1, 0.2, 0.2])),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0., ignore_iof_thr=-1,
                      gt_max_assign_all=False),
        sampler=dict(type='PseudoSampler'), smoothl1_beta=1., allowed_border=-1, pos_weight=-1,
        neg_pos_ratio=3, debug=False),
    test_cfg=dict(nms_pre=1000, nms=dict(type='nms', iou_threshold=0.45), min_bbox_size=0, score_thr=0.02,
                  max_per_img=200))
# mmdet's ssd300 pipelines: images resized to input_size x input_size (the anchors assume it)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Expand', mean=data_preprocessor['mean'], to_rgb=data_preprocessor['bgr_to_rgb'], ratio_range=(1, 4)),
    dict(type='MinIoURandomCrop', min_ious=(0.1, 0.3, 0.5, 0.7, 0.9), min_crop_size=0.3),
    dict(type='Resize', scale=(input_size, input_size), keep_ratio=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion', brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
         hue_delta=18),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(input_size, input_size), keep_ratio=False),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=8, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=8, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=2e-3, momentum=0.9, weight_decay=5e-4))
