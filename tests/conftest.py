import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
if os.environ.get('PYTEST_XDIST_WORKER'):
    # one worker per core: one thread each, for the tests' subprocesses too, instead of oversubscribing the cores
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(items):
    """Start the slowest tests first, so that parallel workers (``-n auto``) finish together."""
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)
