"""The guide's checkpoint tool, as typed: ``python manage_batch_checkpoints.py --action list``.

The same program as ``python -m ckptio`` (``--action list|info|load|clean`` and ``verify``, ``--save_dir``,
``--checkpoint``, ``--keep_count``); it exists so that the batch-checkpoint guide's commands run as written.
"""

import sys

from ckptio.cli import main

if __name__ == "__main__":
    sys.exit(main())
