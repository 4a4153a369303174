"""Copy a trainer's state into reusable CPU buffers, so that it can be written while training goes on.

A state is any nesting of dict / OrderedDict / list / tuple holding tensors and Python scalars. It is split in
two parts: a *skeleton* (plain JSON data describing the nesting and the scalars, with ``{"T": i}`` where tensor
``i`` was, ``{"P": [i, requires_grad]}`` where it was a ``torch.nn.Parameter``) and the list of tensors, copied
into buffers that belong to a :class:`BufferSlot` and are reused by the next snapshot taken in the same slot, so
that thousands of saves do not allocate thousands of copies.

On CUDA the copies run on a side stream into pinned memory with ``non_blocking=True``; the caller's stream is
made to wait for the copy before its next kernel, so that the caller may change its tensors right away while
the CPU never blocks on the device.
"""

from __future__ import annotations

import ctypes
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Allocator",
    "BufferSlot",
    "Snapshot",
    "Staging",
    "StateShape",
    "heap_staging",
    "rebuild",
    "shape_of",
    "state_shape",
    "walk_tensors",
]

_SCALARS = (str, int, float, bool, type(None))


@dataclass
class Snapshot:
    """The state at the moment of ``save()``: a JSON skeleton and CPU tensors (possibly still being copied)."""

    skeleton: Any
    tensors: list[torch.Tensor]
    names: list[str]
    summary: dict[str, Any]
    copy_done: Any = None  # a torch.cuda.Event while device-to-host copies may still be in flight
    element_count: int = 0
    tensor_bytes: int = 0
    model_elements: int | None = None
    segment: Any = None
    """The shared segment (:class:`ckptio.shm.Segment`) that ``tensors`` live in, for the writer process."""

    def wait_until_copied(self) -> None:
        if self.copy_done is not None:
            self.copy_done.synchronize()
            self.copy_done = None

    def materialize(self) -> Any:
        """The state as nested Python containers holding the snapshot's tensors (for ``torch.save``)."""
        self.wait_until_copied()
        return rebuild(self.skeleton, self.tensors)


# Per tensor: shape, dtype, and whether it is copied from a CUDA device (its buffer should then be pinned).
StateShape = tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]


def shape_of(tensors: list[torch.Tensor]) -> StateShape:
    return tuple((tuple(t.shape), t.dtype, t.is_cuda) for t in tensors)


def state_shape(state: Any) -> StateShape:
    """The shapes and dtypes the buffers for a snapshot of ``state`` need (the state is read, never changed)."""
    sources: list[torch.Tensor] = []
    _flatten(state, "", sources, [], {})
    return shape_of(sources)


@dataclass
class Staging:
    """Host buffers laid out for one :data:`StateShape`, ready to take a snapshot without allocating."""

    shape: StateShape
    buffers: list[torch.Tensor]
    segment: Any = None
    """A :class:`ckptio.shm.Segment` when the buffers are views into shared memory."""
    pinned: bool = False

    def release(self) -> None:
        if self.segment is not None:
            self.segment.release()


Allocator = Callable[[StateShape, bool], Staging]
"""``allocator(spec, prepared)``: buffers for ``spec``; ``prepared=True`` (off the training thread) also
pins them for CUDA sources and faults their pages in."""


def heap_staging(spec: StateShape, prepared: bool) -> Staging:
    """One tensor per entry; pinned for CUDA sources when ``prepared`` (in the background), else pageable."""
    pin = prepared and torch.cuda.is_available()
    buffers = []
    for shape, dtype, cuda in spec:
        buffer = torch.empty(shape, dtype=dtype, pin_memory=pin and cuda)
        if prepared and not cuda:
            buffer.zero_()  # fault the pages in now rather than during the first snapshot copy
        buffers.append(buffer)
    return Staging(spec, buffers, pinned=pin and any(cuda for _, _, cuda in spec))


@dataclass
class BufferSlot:
    """Host buffers for one snapshot, reused by every later snapshot taken in this slot."""

    buffers: list[torch.Tensor] = field(default_factory=list)
    allocator: Allocator | None = None
    """Makes buffers for a whole state shape (e.g. in one shared segment); ``None``: one heap tensor each, reused
    one by one."""
    staging: Staging | None = None
    prepared: Staging | None = None
    _copy_streams: dict[int, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def take(self, state: Any) -> Snapshot:
        """Copy ``state`` into this slot's buffers; the caller's objects are read, never changed."""
        sources: list[torch.Tensor] = []
        names: list[str] = []
        seen: dict[tuple[Any, ...], int] = {}
        skeleton = _flatten(state, "", sources, names, seen)
        cuda_sources = [i for i, t in enumerate(sources) if t.is_cuda]
        self._fit_buffers(sources)
        for i, source in enumerate(sources):
            if not source.is_cuda:
                _copy_from_host(self.buffers[i], source)
        copy_done = self._copy_from_devices(sources, cuda_sources) if cuda_sources else None
        tensors = self.buffers[: len(sources)]
        elements = sum(t.numel() for t in tensors)
        return Snapshot(
            skeleton=skeleton,
            tensors=list(tensors),
            names=names,
            summary=_summary(state),
            copy_done=copy_done,
            element_count=elements,
            tensor_bytes=sum(t.numel() * t.element_size() for t in tensors),
            model_elements=_model_elements(state),
            segment=self.staging.segment if self.staging is not None else None,
        )

    def offer(self, staging: Staging) -> None:
        """Buffers prepared in the background for a state shape; the next snapshot of that shape adopts them."""
        with self._lock:
            old, self.prepared = self.prepared, staging
        if old is not None and old is not staging:
            old.release()

    @property
    def needs_prepare(self) -> bool:
        """The current buffers take device copies but are not pinned (allocated in a hurry inside ``take``)."""
        staging = self.staging
        return (staging is not None and not staging.pinned and torch.cuda.is_available()
                and any(cuda for _, _, cuda in staging.shape))

    def release(self) -> None:
        """Give back shared segments and pinned registrations (the manager is closing)."""
        with self._lock:
            prepared, self.prepared = self.prepared, None
        for staging in (prepared, self.staging):
            if staging is not None:
                staging.release()
        self.staging = None
        self.buffers = []

    def _fit_buffers(self, sources: list[torch.Tensor]) -> None:
        spec = shape_of(sources)
        with self._lock:
            prepared = self.prepared
            if prepared is not None and prepared.shape == spec:
                self.prepared = None
        if prepared is not None and prepared.shape == spec:
            self._install(prepared)
            return
        if self.staging is not None and self.staging.shape == spec:
            return
        if self.allocator is not None:  # a shared segment holds the whole state shape: any change is a new one
            self._install(self.allocator(spec, False))
            return
        # Pageable memory only: pinning here would block the caller for ~0.7 s/GB; prepare() pins off-thread.
        for i, source in enumerate(sources):
            if i < len(self.buffers):
                buf = self.buffers[i]
                if buf.dtype == source.dtype and buf.shape == source.shape:
                    continue
            fresh = torch.empty(source.shape, dtype=source.dtype)
            if i < len(self.buffers):
                self.buffers[i] = fresh
            else:
                self.buffers.append(fresh)
        del self.buffers[len(sources):]
        kept_pinned = all(b.is_pinned() for b, (_, _, cuda) in zip(self.buffers, spec, strict=True) if cuda)
        self.staging = Staging(spec, list(self.buffers), pinned=kept_pinned and bool(self.buffers))

    def _install(self, staging: Staging) -> None:
        old, self.staging = self.staging, staging
        self.buffers = list(staging.buffers)
        if old is not None and old is not staging:
            old.release()

    def _copy_from_devices(self, sources: list[torch.Tensor], indices: list[int]) -> Any:
        by_device: dict[int, list[int]] = {}
        for i in indices:
            by_device.setdefault(sources[i].device.index or 0, []).append(i)
        events = []
        for device, members in by_device.items():
            with torch.cuda.device(device):
                stream = self._copy_streams.get(device)
                if stream is None:
                    stream = self._copy_streams[device] = torch.cuda.Stream(device)
                producer = torch.cuda.current_stream(device)
                # The copies must see every kernel queued so far, and later kernels must not overwrite the
                # sources before the copies have read them: order both ways, without blocking the CPU.
                stream.wait_stream(producer)
                with torch.cuda.stream(stream):
                    for i in members:
                        self.buffers[i].copy_(_resolved(sources[i]), non_blocking=True)
                        sources[i].record_stream(stream)
                # blocking: the threads that wait on it sleep instead of spinning a CPU core for the whole copy
                event = torch.cuda.Event(blocking=True)
                event.record(stream)
                producer.wait_event(event)
                events.append((device, event))
        return _AllEvents(events)


def _copy_from_host(buffer: torch.Tensor, source: torch.Tensor) -> None:
    """A plain memcpy where the memory layout allows: ``Tensor.copy_`` enters the intra-op thread pool for every tensor,
    which cost 440 ms instead of 16 ms for CRAFT's 436 tensors while another core was busy (as in training)."""
    if source.is_contiguous() and not source.is_conj() and not source.is_neg():
        nbytes = source.numel() * source.element_size()
        if nbytes:
            ctypes.memmove(buffer.data_ptr(), source.data_ptr(), nbytes)
    else:
        buffer.copy_(source.detach())


def _resolved(source: torch.Tensor) -> torch.Tensor:
    """``source`` without a conjugate or negative bit, resolved by a kernel on the current (side) stream.

    Copied as it is, ``copy_`` would queue the DMA and then apply the bit to the host buffer on the CPU at once,
    while the DMA may still be writing it."""
    source = source.detach()
    if source.is_conj():
        source = source.resolve_conj()
    if source.is_neg():
        source = source.resolve_neg()
    return source


@dataclass
class _AllEvents:
    events: list[tuple[int, Any]]
    """``(device index, event)``: each event is waited on with its own device current."""

    def synchronize(self) -> None:
        for device, event in self.events:
            # The writer and hand-off threads start on device 0: waiting there would create a context
            # (hundreds of MB) on GPU 0 for a rank that uses another GPU.
            with torch.cuda.device(device):
                event.synchronize()


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    storage = t.untyped_storage()
    return (
        t.device.type,
        t.device.index,
        # Every empty storage has the same address (none): only the same tensor object is the same empty tensor.
        storage.data_ptr() if storage.nbytes() else ("empty", id(t)),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
        t.is_conj(),
        t.is_neg(),
    )


def _check_tensor(t: torch.Tensor, path: str) -> None:
    where = path or "the state"
    if t.layout != torch.strided:
        raise ValueError(f"{where} is a {t.layout} tensor; make it a dense tensor with .to_dense() before saving")
    if t.is_quantized:
        raise ValueError(f"{where} is a quantized tensor; dequantize it with .dequantize() before saving")
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where} lives on {t.device}; move it to the CPU or a CUDA device before saving")


def _flatten(obj: Any, path: str, tensors: list[torch.Tensor], names: list[str],
             seen: dict[tuple[Any, ...], int]) -> Any:
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        _check_tensor(obj, path)
        key = _tensor_key(obj)
        index = seen.get(key)
        if index is None:
            index = seen[key] = len(tensors)
            tensors.append(obj)
            names.append(path or "tensor")
        # torch.save keeps a Parameter (and its requires_grad): so do we. Parameter's isinstance runs Python code
        # (its metaclass), so plain tensors skip it.
        if type(obj) is not torch.Tensor and isinstance(obj, torch.nn.Parameter):
            return {"P": [index, obj.requires_grad]}
        return {"T": index}
    if kind in _SCALARS:
        if kind is float and not math.isfinite(obj):
            return {"F": repr(obj)}
        return obj
    if kind is dict or kind is OrderedDict:
        items = []
        for key, value in obj.items():
            if type(key) not in _SCALARS:
                raise ValueError(
                    f"{path or 'the state'} has a key of type {type(key).__name__}; "
                    "use str, int, float, bool or None keys"
                )
            child = f"{path}/{key}" if path else str(key)
            items.append([_flatten(key, "", tensors, names, seen), _flatten(value, child, tensors, names, seen)])
        return {"O" if kind is OrderedDict else "D": items}
    if kind is list or kind is tuple:
        children = [
            _flatten(value, f"{path}/{i}" if path else str(i), tensors, names, seen) for i, value in enumerate(obj)
        ]
        return {"L" if kind is list else "U": children}
    raise ValueError(
        f"{path or 'the state'} is a {kind.__module__}.{kind.__qualname__}, which a checkpoint cannot hold; "
        "convert it to a tensor, a Python scalar, or a dict/list/tuple of those"
    )


def rebuild(node: Any, tensors: list[torch.Tensor]) -> Any:
    """Turn a skeleton back into nested containers, putting ``tensors[i]`` where ``{"T": i}`` stands."""
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise ValueError(f"malformed skeleton node with keys {sorted(node)}")
    ((tag, value),) = node.items()
    if tag == "T":
        if type(value) is not int or not 0 <= value < len(tensors):
            raise ValueError(f"skeleton refers to tensor {value!r}, but the file holds {len(tensors)}")
        return tensors[value]
    if tag == "P":
        if not (type(value) is list and len(value) == 2 and type(value[0]) is int and 0 <= value[0] < len(tensors)
                and type(value[1]) is bool):
            raise ValueError(f"malformed parameter {value!r} in skeleton (the file holds {len(tensors)} tensors)")
        return torch.nn.Parameter(tensors[value[0]], requires_grad=value[1])
    if tag == "F":
        if value not in ("nan", "inf", "-inf"):
            raise ValueError(f"malformed float {value!r} in skeleton")
        return float(value)
    if tag in ("D", "O"):
        pairs = ((rebuild(k, tensors), rebuild(v, tensors)) for k, v in value)
        return OrderedDict(pairs) if tag == "O" else dict(pairs)
    if tag == "L":
        return [rebuild(v, tensors) for v in value]
    if tag == "U":
        return tuple(rebuild(v, tensors) for v in value)
    raise ValueError(f"unknown skeleton tag {tag!r}")


def walk_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested state, in order (duplicates included)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from walk_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from walk_tensors(value)


_SUMMARY_LIMIT = 8192  # bytes of JSON: the summary must fit any container's metadata (a zip comment: 64 KiB)


def _summary(state: Any) -> dict[str, Any]:
    """Top-level scalars (epoch, batch, losses...) that listing and ``info`` show without loading tensors.

    Bounded in size: long strings and the scalars past the limit stay in the checkpoint but not in its summary.
    """
    if not isinstance(state, dict):
        return {}
    summary = {}
    used = 2
    for key, value in state.items():
        if isinstance(key, str) and type(value) in _SCALARS:
            if type(value) is float and not math.isfinite(value):
                value = repr(value)
            if type(value) is str and len(value) > 200:
                continue
            # Counted as stored: escaped JSON, where one emoji takes 12 bytes (a zip comment holds 64 KiB).
            cost = len(json.dumps(key)) + len(json.dumps(value)) + 2
            if used + cost > _SUMMARY_LIMIT or len(key) > 200:
                continue
            used += cost
            summary[key] = value
    return summary


_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _model_elements(state: Any) -> int | None:
    """Parameters in ``state["model_state_dict"]``: its elements, less BatchNorm's running statistics."""
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        return sum(t.numel() for key, t in state["model_state_dict"].items()
                   if isinstance(t, torch.Tensor) and not str(key).endswith(_BUFFER_SUFFIXES))
    return None
