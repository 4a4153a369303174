"""``python -m craft_train``."""

from __future__ import annotations

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still being imported
    sys.exit(130)
except ModuleNotFoundError as exc:  # typically: the project's virtual environment is not active
    sys.exit(f"craft_train: {exc}; run it from the project's environment (`. .venv/bin/activate` after "
             "`make install`)")

if __name__ == "__main__":
    sys.exit(main())
