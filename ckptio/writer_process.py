"""The process writer: a helper process serializes, hashes, writes and commits, off the trainer's GIL.

Lifecycle (what each side does, and what happens when either dies):

* **Start.** The manager starts ``python -m ckptio.writer_process FD`` (a fresh interpreter, never a fork of a
  process that may hold CUDA; ``subprocess`` rather than ``multiprocessing``'s spawn so that the trainer's
  ``__main__`` is not re-imported in it) with ``CUDA_VISIBLE_DEVICES`` empty, and returns at once: saves queue
  on the socket while it boots. It ignores SIGINT, SIGTERM and SIGUSR1, so that Ctrl-C in the terminal, or a
  scheduler's signal to every process of the job, lets queued saves (and the trainer's preemption save) finish.
* **Slots.** Each staging slot is one ``memfd`` segment (:mod:`ckptio.shm`); its descriptor is passed once over
  the Unix socket (``SCM_RIGHTS``) before the first job that uses it, with the tensors' offsets. A job carries
  only the skeleton, names and the slot it lives in.
* **Jobs.** The child runs :class:`ckptio.writer.JobRunner`, the same code as the thread writer, and sends each
  :class:`~ckptio.writer.Report` and its log records back. A receiver thread in the trainer hands reports to
  the manager; it sleeps in ``recv`` (GIL released) and unpickles one small report per save.
* **CUDA copies.** The child cannot wait on CUDA events, so a job whose device-to-host copy is still in flight
  is sent by a hand-off thread once the copy's event completed. The slot is never read before it is complete:
  a trainer killed at any moment leaves a complete checkpoint or none.
* **Trainer death.** The child reads every job already in the socket, sees EOF, finishes them and exits.
* **Writer death.** The receiver sees EOF; every save it had not reported fails with
  :class:`~ckptio.CheckpointWriteError` naming it, raised by the next ``save()``/``wait()``/``close()``; the
  next save starts a new writer process.
* **Directory lock.** The writer inherits the trainer's descriptor of the directory lock, so the lock is held
  while either process lives: after a kill -9 of the trainer, a restarted run's manager waits (bounded, with a
  message) until the orphaned writer has committed what it was given and exited.
* **Leftovers.** Segments have no name in any filesystem: they vanish with the last process that maps them.
  A killed writer's temporary files are removed as any crashed writer's are, once no writer holds the lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

from .config import CheckpointOptions
from .errors import CheckpointWriteError
from .snapshot import Snapshot
from .writer import JobRunner, Report, WriteJob, WriterBackend

__all__ = ["ProcessWriter", "main"]

log = logging.getLogger("ckptio")

NICE = 0
"""Added to the writer's CPU niceness (see README, "Writer process", for the measurement behind it)."""
IO_CLASS: tuple[int, int] | None = None
"""``(class, level)`` for ``ioprio_set`` (2 = best effort, 3 = idle), or ``None`` to inherit the trainer's."""

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass
class _Generation:
    """One writer process, and what the trainer sent it that it has not answered yet."""

    process: subprocess.Popen[bytes]
    conn: Connection
    in_flight: dict[int, str] = field(default_factory=dict)
    announced: dict[str, int] = field(default_factory=dict)
    dead: bool = False
    receiver: threading.Thread | None = None


class ProcessWriter(WriterBackend):
    def __init__(self, directory: Path, options: CheckpointOptions, on_report: Any, on_lost: Any,
                 lock_fd: int | None = None) -> None:
        self._directory = directory
        self._lock_fd = lock_fd
        self._options = options
        self._on_report = on_report
        self._on_lost = on_lost
        self._lock = threading.Lock()  # guards the generation and its in-flight table
        self._send_lock = threading.Lock()  # one message (and its descriptors) at a time on the socket
        self._closing = False
        # Each job travels with the writer generation it was registered with (see _hand_off).
        self._handoff: queue.Queue[tuple[WriteJob, _Generation] | None] = queue.Queue()
        self._handoff_thread: threading.Thread | None = None
        self._generation = self._launch()

    @property
    def pid(self) -> int:
        return self._generation.process.pid

    def alive(self) -> bool:
        # A dead writer process reports its lost jobs itself, and the next submit starts a new one; a dead
        # hand-off thread would leave every job behind it unanswered, so wait() and save() must hear of it.
        thread = self._handoff_thread
        return thread is None or thread.is_alive() or self._closing

    def submit(self, job: WriteJob) -> None:
        """Hand ``job`` over; if this raises (no new writer process could start), the job was never taken."""
        with self._lock:
            if self._generation.dead:
                self._generation = self._launch()
            self._generation.in_flight[job.ticket] = job.name
            generation = self._generation
        try:
            copying = any(s is not None and s.copy_done is not None for s in (job.snapshot, job.shard))
            if copying or self._handoff.unfinished_tasks:  # never let a later save overtake one still copying
                self._start_handoff()
                self._handoff.put((job, generation))
                return
        except BaseException:  # e.g. no thread could start: the caller forgets the save
            with self._lock:
                generation.in_flight.pop(job.ticket, None)
            raise
        self._send_job(generation, job)

    def _refuse(self, generation: _Generation, job: WriteJob, exc: BaseException) -> None:
        """A job that could not be sent (e.g. metadata that cannot be pickled) fails like a failed write."""
        with self._lock:
            generation.in_flight.pop(job.ticket, None)
        try:
            self._on_report(Report(job.ticket, "failed", error=exc))
        except Exception:  # the hand-off thread must outlive any one report, or later saves never resolve
            log.exception("could not apply the failure of save %d", job.ticket)

    def close(self) -> None:
        self._closing = True
        if self._handoff_thread is not None:
            self._handoff.put(None)
            self._handoff_thread.join()
        generation = self._generation
        with contextlib.suppress(OSError):
            # EOF tells the writer that nothing more comes; it finishes what it has, then exits.
            with socket.socket(fileno=os.dup(generation.conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_WR)
        if generation.receiver is not None:
            generation.receiver.join()

    # -- trainer side ---------------------------------------------------------------------------------------

    def _launch(self) -> _Generation:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ""  # the writer only reads host memory: it must never create a context
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        # The writer shares the directory lock (the same open file, so the same flock): a trainer killed with
        # saves still queued leaves the directory locked until its writer has committed them and exited, so a
        # restarted run neither writes beside it nor sweeps its temporary files (CheckpointManager waits).
        shared = (child.fileno(),) if self._lock_fd is None else (child.fileno(), self._lock_fd)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "ckptio.writer_process", str(child.fileno())],
                pass_fds=shared, env=env, stdin=subprocess.DEVNULL, close_fds=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        generation = _Generation(process, Connection(parent.detach()))
        _trainer_sockets.add(generation.conn)
        try:
            self._send(generation, ("start", str(self._directory), self._options, NICE, IO_CLASS))
            generation.receiver = threading.Thread(target=self._receive, args=(generation,), daemon=True,
                                                   name=f"ckptio-writer-receiver:{process.pid}")
            generation.receiver.start()
        except BaseException:  # without a receiver nobody would hear of its saves: this writer must not live on
            generation.conn.close()
            process.kill()
            process.wait()
            raise
        return generation

    def _start_handoff(self) -> None:
        if self._handoff_thread is None:
            self._handoff_thread = threading.Thread(target=self._hand_off, daemon=True, name="ckptio-handoff")
            self._handoff_thread.start()

    def _hand_off(self) -> None:
        while True:
            item = self._handoff.get()
            try:
                if item is None:
                    return
                job, generation = item
                try:
                    for snapshot in (job.snapshot, job.shard):
                        if snapshot is not None:
                            snapshot.wait_until_copied()  # blocks in CUDA with the GIL released
                except Exception as exc:  # the copy failed on the device: this save fails, the writer goes on
                    self._refuse(generation, job, exc)
                    continue
                with self._lock:
                    # If its writer died meanwhile, the job was already failed and its slot freed (maybe taken by
                    # a newer save): sending it to the next writer would seal that newer data under this name.
                    current = not generation.dead and job.ticket in generation.in_flight
                if current:
                    self._send_job(generation, job)
            finally:
                self._handoff.task_done()

    def _send_job(self, generation: _Generation, job: WriteJob) -> None:
        try:
            wire = pickle.dumps(("job", {
                "ticket": job.ticket, "name": job.name, "metadata": job.metadata, "token": job.token, "dcp": job.dcp,
                "snapshot": _wire_snapshot(job.snapshot), "shard": _wire_snapshot(job.shard),
            }), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            self._refuse(generation, job, exc)
            return
        try:
            with self._send_lock:
                for snapshot in (job.snapshot, job.shard):
                    if snapshot is None:
                        continue
                    segment = snapshot.segment
                    if generation.announced.get(segment.key) != segment.serial:
                        generation.conn.send(("map", segment.key, segment.serial, segment.size, segment.tensor_map))
                        send_handle(generation.conn, segment.fd, generation.process.pid)
                        generation.announced[segment.key] = segment.serial
                generation.conn.send_bytes(wire)
        except OSError:
            pass  # the writer died: the receiver sees EOF and reports this job as lost

    def _send(self, generation: _Generation, message: Any) -> None:
        with self._send_lock, contextlib.suppress(OSError):
            generation.conn.send(message)

    def _receive(self, generation: _Generation) -> None:
        conn = generation.conn
        try:
            while True:
                message = conn.recv()
                if message[0] == "report":
                    report: Report = message[1]
                    with self._lock:
                        generation.in_flight.pop(report.ticket, None)
                    try:
                        self._on_report(report)
                    except Exception:  # this thread must outlive any one report, or later saves never resolve
                        log.exception("could not apply the writer's report on save %d", report.ticket)
                elif message[0] == "log":
                    log.log(message[1], "%s", message[2])
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        code = generation.process.wait()
        conn.close()
        with self._lock:
            generation.dead = True
            lost = dict(generation.in_flight)
            generation.in_flight.clear()
        if lost or not self._closing or code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            self._on_lost(sorted(lost), f"the checkpoint writer process {generation.process.pid} {how}")


# A process forked from the trainer (a DataLoader worker) inherits the writer's socket: while it lives, a writer
# whose trainer was killed would not see EOF. In the fork, the descriptor is pointed at /dev/null (not closed:
# the inherited Connection object would later close whatever file reused the number).
_trainer_sockets: weakref.WeakSet[Connection] = weakref.WeakSet()


def _detach_sockets_in_fork() -> None:
    for conn in list(_trainer_sockets):
        with contextlib.suppress(OSError):
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            os.dup2(null, conn.fileno())
            os.close(null)


os.register_at_fork(after_in_child=_detach_sockets_in_fork)


def _wire_snapshot(snapshot: Snapshot | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    if snapshot.segment is None:
        raise RuntimeError("the process writer needs snapshots taken into shared segments")
    return {
        "key": snapshot.segment.key, "serial": snapshot.segment.serial, "skeleton": snapshot.skeleton,
        "names": snapshot.names, "summary": snapshot.summary, "count": len(snapshot.tensors),
        "element_count": snapshot.element_count, "tensor_bytes": snapshot.tensor_bytes,
        "model_elements": snapshot.model_elements,
    }


# -- the writer process --------------------------------------------------------------------------------------


_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}


def _lower_priority(nice: int, io_class: tuple[int, int] | None) -> None:
    if nice:
        os.nice(nice)
    number = _IOPRIO_SET.get(platform.machine())
    if io_class is not None and number is not None:
        klass, level = io_class
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(number, 1, 0, (klass << 13) | level)  # IOPRIO_WHO_PROCESS, this process


class _Child:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.send_lock = threading.Lock()
        self.inbox: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self.segments: dict[str, Any] = {}

    def send(self, message: Any) -> None:
        with self.send_lock, contextlib.suppress(OSError):
            self.conn.send(message)

    def read(self) -> None:
        """Take every message off the socket at once, so that the trainer never waits on a full socket."""
        try:
            while True:
                message = self.conn.recv()
                if message[0] == "map":
                    fd = recv_handle(self.conn)
                    message = (*message, fd)
                self.inbox.put(message)
        except (EOFError, OSError):
            pass
        finally:
            self.inbox.put(None)

    def snapshot(self, wire: dict[str, Any] | None) -> Snapshot | None:
        if wire is None:
            return None
        from .shm import tensor_views

        segment, views = self.segments[wire["key"]]
        if segment.serial != wire["serial"]:
            raise RuntimeError(f"slot {wire['key']} holds segment {segment.serial}, the job expects {wire['serial']}")
        if views is None:
            views = tensor_views(segment.buffer, segment.tensor_map)
            self.segments[wire["key"]] = (segment, views)
        return Snapshot(
            skeleton=wire["skeleton"], tensors=views[: wire["count"]], names=wire["names"], summary=wire["summary"],
            element_count=wire["element_count"], tensor_bytes=wire["tensor_bytes"],
            model_elements=wire["model_elements"],
        )

    def work(self, runner: JobRunner) -> None:
        from .shm import Segment

        while True:
            message = self.inbox.get()
            if message is None:
                return
            if message[0] == "map":
                _, key, serial, size, tensor_map, fd = message
                self.segments.pop(key, None)  # the old mapping goes with its last view
                self.segments[key] = (Segment.attach(fd, size, key=key, serial=serial, tensor_map=tensor_map), None)
                continue
            wire = message[1]
            try:
                job = WriteJob(wire["ticket"], wire["name"], self.snapshot(wire["snapshot"]), wire["metadata"],
                               self.snapshot(wire["shard"]), wire["token"], wire["dcp"])
            except Exception as exc:
                report = Report(wire["ticket"], "failed", error=exc)
            else:
                report = runner.run(job)
                del job
            self.send(("report", _portable(report)))


def _portable(report: Report) -> Report:
    """The report, with an error that survives pickling (some exceptions' constructors do not)."""
    if report.error is not None:
        try:
            pickle.loads(pickle.dumps(report.error))
        except Exception:
            error = CheckpointWriteError(f"{type(report.error).__name__}: {report.error}")
            report.error = error
    return report


class _ForwardingHandler(logging.Handler):
    def __init__(self, child: _Child) -> None:
        super().__init__(logging.INFO)
        self.child = child

    def emit(self, record: logging.LogRecord) -> None:
        self.child.send(("log", record.levelno, record.getMessage()))


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C, and the SIGTERM that SLURM (and `kill -- -PGID`) sends to every process of a job, are for the trainer:
    # it saves on them and needs this writer for that save. The writer finishes what it was given and exits when
    # the trainer closes the socket (or dies); SIGKILL still ends it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # SIGUSR1: SLURM's `--signal=USR1@T`
        signal.signal(signum, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m ckptio.writer_process FD  (started by CheckpointManager(writer='process'))",
              file=sys.stderr)
        return 2
    child = _Child(Connection(int(args[0])))
    try:
        start = child.conn.recv()
    except (EOFError, OSError):
        return 0  # the trainer went away before sending anything
    _, directory, options, nice, io_class = start
    _lower_priority(nice, io_class)
    logger = logging.getLogger("ckptio")
    logger.addHandler(_ForwardingHandler(child))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    reader = threading.Thread(target=child.read, name="ckptio-writer-reader", daemon=True)
    reader.start()
    child.work(JobRunner(Path(directory), options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
