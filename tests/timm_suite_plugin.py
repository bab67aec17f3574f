"""pytest plugin: run timm's own model test-suite (tests/test_models.py of timm's sdist) on our models.

Loaded with ``-p timm_suite_plugin``: importing ``timm_nlp`` here registers the pooled models before
test_models.py is collected (it parametrises over ``timm.list_models()``); collection then keeps only the
tests whose ``model_name`` is in ``TIMM_NLP_SUITE_MODELS`` (comma separated).
"""
import os

import timm_nlp  # noqa: F401  registers the models


def pytest_collection_modifyitems(config, items):
    wanted = set(filter(None, os.environ.get('TIMM_NLP_SUITE_MODELS', '').split(',')))
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'params', {})
        (keep if params.get('model_name') in wanted else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
