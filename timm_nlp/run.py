"""Run any timm script with the pooled models registered: ``python -m timm_nlp.run validate.py ARGS...``.

timm's validate.py, benchmark.py and inference.py have no ``--device-modules`` flag; this imports timm_nlp,
then executes the script as ``__main__`` with the remaining arguments.
"""
import os
import runpy
import sys

import timm_nlp  # noqa: F401  registers the models


def main() -> None:
    if len(sys.argv) < 2 or not sys.argv[1].endswith('.py'):
        sys.exit('usage: python -m timm_nlp.run SCRIPT.py [ARGS...]  (e.g. validate.py from a timm checkout)')
    script = sys.argv[1]
    if not os.path.isfile(script):
        sys.exit(f"timm_nlp.run: script '{script}' not found")
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
