"""One TensorFlow Lite Micro run, in a process of its own (a too-small arena can take the process down):
``python _tflm_child.py MODEL ARENA [INPUTS.npy OUTPUTS.npy] [--print-allocations]``.

Prints ``OK`` when the interpreter was built and every input ran; writes the outputs (one per input sample, stacked);
``--print-allocations`` has TFLite Micro print its arena's use (head, tail, total) to stderr.
"""
import sys

import numpy as np
from tflite_micro.python.tflite_micro import runtime


def main(argv) -> None:
    path, arena = argv[0], int(argv[1])
    with open(path, 'rb') as f:
        interpreter = runtime.Interpreter.from_bytes(f.read(), arena_size=arena)
    files = [a for a in argv[2:] if not a.startswith('--')]
    if files:
        inputs = np.load(files[0])
    else:
        details = interpreter.get_input_details(0)
        inputs = np.zeros((1, *details['shape']), details['dtype'])
    outputs = []
    for x in inputs:
        interpreter.set_input(x, 0)
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_output(0)))
    if files:
        np.save(files[1], np.stack(outputs))
    if '--print-allocations' in argv:
        sys.stdout.flush()
        interpreter.print_allocations()
    print('OK', flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
