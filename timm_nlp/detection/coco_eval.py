"""COCO mean average precision with pycocotools, from in-memory ground truth and predictions."""
import contextlib
import copy
import io
from typing import Any, Dict, List

__all__ = ['coco_map', 'predictions_to_coco']

_STAT_NAMES = ('mAP', 'mAP_50', 'mAP_75', 'mAP_small', 'mAP_medium', 'mAP_large',
               'AR_1', 'AR_10', 'AR_100', 'AR_small', 'AR_medium', 'AR_large')


def predictions_to_coco(outputs: List[Dict[str, Any]], image_ids: List[int]) -> List[Dict[str, Any]]:
    """torchvision detector outputs (xyxy boxes) -> COCO result dicts (xywh boxes); one image id per output."""
    if len(outputs) != len(image_ids):
        raise ValueError(f'{len(outputs)} detector outputs for {len(image_ids)} image ids; give one id per output.')
    results = []
    for out, image_id in zip(outputs, image_ids):
        for box, score, label in zip(out['boxes'].tolist(), out['scores'].tolist(), out['labels'].tolist()):
            x1, y1, x2, y2 = box
            results.append(dict(image_id=int(image_id), category_id=int(label), bbox=[x1, y1, x2 - x1, y2 - y1],
                                score=float(score)))
    return results


def coco_map(ground_truth: Dict[str, Any], results: List[Dict[str, Any]]) -> Dict[str, float]:
    """COCO box metrics (mAP@[.5:.95], mAP@.5, ...) of ``results`` against a COCO-format ``ground_truth`` dict.

    A metric is -1.0, as pycocotools reports it, where the ground truth has no object of its size range.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        if results:
            dt = gt.loadRes(copy.deepcopy(results))
        else:  # pycocotools' loadRes refuses an empty list
            dt = COCO()
            dt.dataset = dict(images=gt.dataset['images'], categories=gt.dataset['categories'], annotations=[])
            dt.createIndex()
        ev = COCOeval(gt, dt, 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(_STAT_NAMES, ev.stats)}
