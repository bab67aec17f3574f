"""pytest plugin: run timm's own model test-suite (tests/test_models.py of timm's sdist) on our models.

Loaded with ``-p timm_suite_plugin``: importing ``timm_nlp`` here registers the pooled models before
test_models.py is collected (it parametrises over ``timm.list_models()``); collection then keeps only the
tests whose ``model_name`` is in ``TIMM_NLP_SUITE_MODELS`` (comma separated). timm restricts some tests
(``forward_intermediates``, layer pruning) to a list of its model modules; our families are its ResNet and
EfficientNet classes in modules of their own, so wherever that list names ``resnet`` or ``efficientnet`` it takes
ours too.
"""
import functools
import os

import timm

import timm_nlp  # noqa: F401  registers the models

_FAMILIES = {'resnet': 'pooled_resnet', 'efficientnet': 'pooled_mobilenetv2'}
_list_models = timm.list_models


@functools.wraps(_list_models)
def _list_models_with_ours(*args, module='', **kwargs):
    if isinstance(module, (list, tuple)):
        module = list(module) + [ours for theirs, ours in _FAMILIES.items() if theirs in module]
    return _list_models(*args, module=module, **kwargs)


timm.list_models = _list_models_with_ours


def pytest_collection_modifyitems(config, items):
    wanted = set(filter(None, os.environ.get('TIMM_NLP_SUITE_MODELS', '').split(',')))
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        (keep if params.get('model_name') in wanted else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
