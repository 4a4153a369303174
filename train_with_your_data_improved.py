"""The guide's training command, as typed: ``python train_with_your_data_improved.py --epochs 50 --batch_size 16``.

The same program as ``python -m craft_train`` (every flag, in the guide's ``--batch_size`` spelling or as
``--batch-size``); it exists so that the batch-checkpoint guide's commands run as written.
"""

import sys

from craft_train.__main__ import _start

if __name__ == "__main__":
    sys.exit(_start())
