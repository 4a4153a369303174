"""``python -m craft_train``."""

from __future__ import annotations

import signal
import sys
from typing import Any


def _start() -> int:
    # Importing torch takes seconds. A KeyboardInterrupt raised inside its C++ initialisation aborts the process
    # ("terminate called after throwing..."), so during the imports Ctrl-C only takes note, and the run stops
    # right after them. A SIGINT that the parent ignores stays ignored.
    interrupted: list[int] = []

    def take_note(signum: int, frame: Any) -> None:
        interrupted.append(signum)

    guard = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if guard:
        signal.signal(signal.SIGINT, take_note)
    try:
        from .cli import main
    except ModuleNotFoundError as exc:  # typically: the project's virtual environment is not active
        hint = "" if ".venv" in str(exc) else ("; run it from the project's environment (`. .venv/bin/activate` "
                                                "after `make install`)")
        print(f"craft_train: {exc}{hint}", file=sys.stderr)
        return 1
    finally:
        if guard:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        print("craft_train: interrupted during start-up; nothing was written", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(_start())
