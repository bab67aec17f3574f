# MMDetection 3.x: SSD on a pooled ResNet-18 (the paper's config form for the backbone).
#   python tools/train.py train_scripts/mmdet/ssd_resnet18_nlp_coco.py     (in an mmdet checkout)
_base_ = [
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_2x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['timm_nlp.detection'], allow_failed_imports=False)
input_size = 300
model = dict(
    type='SingleStageDetector',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_size_divisor=1),
    backbone=dict(type='TimmNLPBackbone', name='resnet18-nlp_headfix2_nowin_reduced-1222', out_indices=(3, 4)),
    neck=dict(type='SSDNeck', in_channels=(256, 512), out_channels=(256, 512, 512, 256, 256, 256),
              level_strides=(2, 2, 1, 1), level_paddings=(1, 1, 0, 0), l2_norm_scale=20),
    bbox_head=dict(
        type='SSDHead', in_channels=(256, 512, 512, 256, 256, 256), num_classes=80,
        anchor_generator=dict(type='SSDAnchorGenerator', scale_major=False, input_size=input_size,
                              basesize_ratio_range=(0.15, 0.9), strides=[16, 32, 64, 100, 150, 300],
                              ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0], target_stds=[0.1, 0.1, 0.2, 0.2])),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0., ignore_iof_thr=-1,
                      gt_max_assign_all=False),
        sampler=dict(type='PseudoSampler'), smoothl1_beta=1., allowed_border=-1, pos_weight=-1,
        neg_pos_ratio=3, debug=False),
    test_cfg=dict(nms_pre=1000, nms=dict(type='nms', iou_threshold=0.45), min_bbox_size=0, score_thr=0.02,
                  max_per_img=200))
