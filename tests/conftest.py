import logging
import os
import subprocess
import sys

import pytest
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


@pytest.fixture
def run_cli(capsys, monkeypatch, tmp_path):
    """``timm-nlp ARGS`` run in this process from an empty folder, as a ``CompletedProcess`` (exit status, stdout,
    stderr): for commands that stop before any work, without a new interpreter's five seconds of imports. An
    exception that ``main`` lets through fails the test, as its traceback would fail a subprocess."""
    from timm_nlp.cli import main
    monkeypatch.chdir(tmp_path)

    def run(*args) -> subprocess.CompletedProcess:
        handlers, level = logging.root.handlers[:], logging.getLogger('timm').level
        capsys.readouterr()
        try:
            with torch.random.fork_rng(devices=[]):
                status = main([str(a) for a in args])
        except SystemExit as e:  # argparse's errors and --help
            status = e.code
        finally:
            logging.root.handlers[:] = handlers  # main's logging setup holds the captured stderr
            logging.getLogger('timm').setLevel(level)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, out, err)
    return run
