"""The thread writer: one background thread in the training process runs every job, in order.

It starts instantly and needs nothing shared, so it is the fallback and the writer for tests; its cost is that
its Python work (``torch.save``'s pickling, the writer's bookkeeping) holds the training thread's GIL.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from .writer import JobRunner, Report, WriteJob, WriterBackend

__all__ = ["ThreadWriter"]


class ThreadWriter(WriterBackend):
    def __init__(self, runner: JobRunner, on_report: Callable[[Report], None], *, name: str) -> None:
        self._runner = runner
        self._on_report = on_report
        self._jobs: queue.Queue[WriteJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: WriteJob) -> None:
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            report = self._runner.run(job)
            self._on_report(report)
