"""A PyTorch Lightning ``CheckpointIO`` that writes through :class:`ckptio.CheckpointManager`.

>>> import ckptio.lightning  # doctest: +SKIP
>>> trainer = Trainer(plugins=[ckptio.lightning.CheckpointIO()])  # doctest: +SKIP

``save_checkpoint`` copies the checkpoint into the manager's reusable host buffers (pinned for CUDA tensors,
never a second copy on the device) and returns; the file is written, sealed with its digest, fsynced and renamed
into place in the background. What Lightning's own ``AsyncCheckpointIO`` leaves open is closed here:

- ``remove_checkpoint`` of a path whose write is still pending never races it: the write lands and is dropped,
  it never appears under its name. The newest checkpoint that is durable in a directory is removed only once a
  newer one has landed there, and a checkpoint this plugin loaded (a resume) is never removed; both are logged.
- ``load_checkpoint`` waits for a pending write of that path, checks the digest, and also reads plain
  ``torch.save`` files (checkpoints written before the switch).
- every save has a future (returned by ``save_checkpoint`` and kept by :meth:`CheckpointIO.future`), and
  ``on_saved`` is called once the file is in place: the moment a logger may upload it.
- a background error is raised once, naming the file, by the next call (or the next training step with
  :meth:`CheckpointIO.callback`), and then cleared; ``teardown`` waits for every pending write.

This module imports Lightning; ``import ckptio`` does not import this module.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _LightningCheckpointIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.callbacks import Callback
except ModuleNotFoundError as _missing:
    raise ModuleNotFoundError(
        f"ckptio.lightning needs PyTorch Lightning ({_missing.name!r} is missing): pip install 'ckptio[lightning]'",
        name=_missing.name,
    ) from None

from .atomic import fsync_directory
from .config import CheckpointOptions
from .errors import CheckpointWriteError
from .fileio import SavedCheckpoint, load, read_meta
from .manager import CheckpointManager

__all__ = ["CheckpointIO", "decode_objects", "encode_objects"]

log = logging.getLogger("ckptio")

# Settings that would let the manager delete or skip files behind Lightning's back: ModelCheckpoint decides
# what to keep, and it counts on every save it asked for.
_ALLOWED_OPTIONS = ("compression_level", "compression_threads", "async_save", "max_pending", "fsync",
                    "drop_page_cache")
_OBJECT_KEY = "__ckptio.lightning.object__"
_SCALARS = (str, int, float, bool, type(None))
_FUTURES_KEPT = 1024


@dataclass(eq=False)
class _Save:
    """One save on its way to ``target`` (the path Lightning asked for)."""

    target: Path
    staged: Path
    future: Future[SavedCheckpoint]
    discard: bool = False


@dataclass
class _Directory:
    manager: CheckpointManager
    pending: list[_Save] = field(default_factory=list)
    newest: Path | None = None
    """The newest checkpoint this plugin made durable here: a resume needs it until a newer one lands."""
    deferred: set[Path] = field(default_factory=set)
    """Removals of ``newest`` asked for while a newer save was pending; done when one lands."""
    told_deferral: bool = False


class CheckpointIO(_LightningCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: asynchronous, atomic, checksummed saves through ckptio.

    Args:
        format: ``"torch"`` (a ``torch.save`` zip; written to any name, ``.ckpt`` included) or ``"safetensors"``.
        compression: ``None`` or ``"zstd"``.
        writer: ``"thread"`` or ``"process"`` (see :class:`ckptio.CheckpointOptions`).
        on_saved: called with the :class:`ckptio.SavedCheckpoint` (its ``path`` is Lightning's path) from the
            writer once the file is durable under its name; an exception it raises surfaces like a failed save.
        verify: check the digest of ckptio files when loading them.
        **options: ``compression_level``, ``compression_threads``, ``async_save``, ``max_pending``, ``fsync``,
            ``drop_page_cache`` (fields of :class:`ckptio.CheckpointOptions`).

    A format other than uncompressed ``torch`` writes files with ckptio's suffix (``.pth.zst``,
    ``.safetensors``...), so the path Lightning asks for must end with it: set the callback's
    ``FILE_EXTENSION``, e.g. ``ModelCheckpoint(...).FILE_EXTENSION = ".pth.zst"``.
    """

    def __init__(self, *, format: str = "torch", compression: str | None = None, writer: str = "thread",
                 on_saved: Callable[[SavedCheckpoint], None] | None = None, verify: bool = True,
                 **options: Any) -> None:
        refused = sorted(set(options) - set(_ALLOWED_OPTIONS))
        if refused:
            raise ValueError(
                f"ckptio.lightning.CheckpointIO does not take {', '.join(refused)}: ModelCheckpoint decides which "
                f"checkpoints to keep (save_top_k) and expects every save it asks for; allowed options are "
                f"format, compression, writer, on_saved, verify, {', '.join(_ALLOWED_OPTIONS)}")
        # Validated now, not at the first save: a typo should stop the run before it trains.
        self.options = CheckpointOptions(format=format, compression=compression, writer=writer,  # type: ignore[arg-type]
                                         on_no_space="raise", **options)
        self.on_saved = on_saved
        self.verify = verify
        self._lock = threading.RLock()
        self._directories: dict[Path, _Directory] = {}
        self._errors: list[CheckpointWriteError] = []
        # The manager keeps each background error to raise it itself, and also fails the save's future with it:
        # one copy is raised, never both.
        self._via_future: set[BaseException] = set()
        self._raised: set[BaseException] = set()
        self._futures: collections.OrderedDict[Path, Future[SavedCheckpoint]] = collections.OrderedDict()
        self._loaded: set[Path] = set()

    # -- Lightning's interface ------------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> Future[SavedCheckpoint]:
        """Snapshot ``checkpoint`` and return; the file appears at ``path`` once durable (see :meth:`future`)."""
        if storage_options is not None:
            raise TypeError("ckptio.lightning.CheckpointIO takes no storage_options; configure it in its constructor")
        if _is_url(path):
            raise ValueError(f"{path}: ckptio writes local files only; save to a local path (or use Lightning's "
                             "TorchCheckpointIO for remote storage)")
        self.raise_error()
        target = _local_path(path)
        state = encode_objects(checkpoint)
        with self._lock:
            directory = self._directory(target.parent)
            name, staged = self._staging_name(directory.manager, target)
            save = _Save(target, staged, Future())
            save.future.set_running_or_notify_cancel()  # a caller's cancel() must not break the writer's report
            directory.pending.append(save)
        try:
            inner = self._manager_call(lambda: directory.manager.save(state, name=name))
        except BaseException:
            with self._lock:
                directory.pending.remove(save)
            raise
        assert inner is not None  # on_full="block": the manager never drops a save
        with self._lock:
            self._futures[target] = save.future
            self._futures.move_to_end(target)
            while len(self._futures) > _FUTURES_KEPT:
                self._futures.popitem(last=False)
        inner.add_done_callback(lambda done: self._landed(directory, save, done))
        return save.future

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Wait for a pending write of ``path``, then load it (digest checked); plain ``torch.save`` files too."""
        if _is_url(path):
            return TorchCheckpointIO().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        target = _local_path(path)
        real = Path(os.path.realpath(target))
        self.wait(target)
        if real != target:
            self.wait(real)
        with self._lock:
            self._loaded.update({target, real})
        seal, _ = read_meta(real)
        if seal is None:  # not written by ckptio: an earlier run's torch.save file
            return TorchCheckpointIO().load_checkpoint(real, map_location=map_location, weights_only=weights_only)
        return decode_objects(load(real, map_location=map_location, verify=self.verify), weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove ``path``; a pending write of it is dropped when it lands (never raced, never half-deleted)."""
        if _is_url(path):
            TorchCheckpointIO().remove_checkpoint(path)
            return
        target = _local_path(path)
        with self._lock:
            directory = self._directories.get(target.parent)
            for save in directory.pending if directory else ():
                if save.target == target:
                    save.discard = True
            if target in self._loaded:
                log.warning("kept %s: this run loaded it (it is the checkpoint the run resumed from)", target)
                return
            if directory is not None and target == directory.newest and self._live(directory):
                directory.deferred.add(target)
                # Routine when the writer is behind top-k: said loudly once per directory, quietly after.
                level = logging.INFO if directory.told_deferral else logging.WARNING
                directory.told_deferral = True
                log.log(level, "removing %s waits until a newer checkpoint in %s is durable: it is the newest one a "
                            "resume could use", target, target.parent)
                return
            _remove(target)
            self._futures.pop(target, None)
        self.raise_error()

    def teardown(self) -> None:
        """Wait for every pending write, close the writers, and raise the first error not yet raised."""
        with self._lock:
            directories, self._directories = list(self._directories.values()), {}
        first: BaseException | None = None
        for directory in directories:  # every writer is closed, even after one of them raised
            try:
                self._manager_call(directory.manager.close)
            except Exception as exc:
                first = first or exc
        if first is not None:
            self._log_errors()
            raise first
        self.raise_error()

    # -- ckptio's additions ---------------------------------------------------------------------------------

    def future(self, path: Any) -> Future[SavedCheckpoint] | None:
        """The future of the latest save to ``path`` (of the last 1024 paths saved), or ``None``."""
        with self._lock:
            return self._futures.get(_local_path(path))

    def wait(self, path: Any = None) -> None:
        """Block until the pending writes (of ``path`` only, if given) are durable; raise an error not yet raised."""
        with self._lock:
            if path is None:
                managers = [d.manager for d in self._directories.values()]
                waits: list[Future[SavedCheckpoint]] = []
            else:
                target = _local_path(path)
                directory = self._directories.get(target.parent)
                managers = []
                waits = [s.future for s in directory.pending if s.target == target] if directory else []
        for manager in managers:
            self._manager_call(manager.wait)
        for waited in waits:
            # The manager resolves every save it accepted, its writer dying included; the error is ours to raise.
            waited.exception()
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the first background error not raised yet (the others are logged), and forget them all."""
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            for later in errors[1:]:
                log.error("%s", later)
            raise errors[0]

    def _log_errors(self) -> None:
        """Log (and forget) the background errors not raised yet: another error is on its way up."""
        with self._lock:
            errors, self._errors = self._errors, []
        for error in errors:
            log.error("%s", error)

    def callback(self) -> Callback:
        """A Lightning callback that raises a background error at the start of the next training step."""
        return _RaiseErrors(self)

    @property
    def pending(self) -> int:
        """Saves accepted and not yet durable (or failed)."""
        with self._lock:
            return sum(len(d.pending) for d in self._directories.values())

    # -- internals ------------------------------------------------------------------------------------------

    def _directory(self, path: Path) -> _Directory:
        directory = self._directories.get(path)
        if directory is None:
            directory = self._directories[path] = _Directory(CheckpointManager(path, options=self.options))
        return directory

    def _staging_name(self, manager: CheckpointManager, target: Path) -> tuple[str, Path]:
        """The manager's name for a save to ``target``, and where the manager writes it."""
        suffix = manager.path_for("x").name[1:]
        if target.name.endswith(suffix) and len(target.name) > len(suffix):
            return target.name[: -len(suffix)], target
        if self.options.format == "torch" and self.options.compression is None:
            # A torch zip is a torch zip under any name: written beside its target, renamed once sealed.
            return target.name, manager.path_for(target.name)
        raise ValueError(f"{target}: with format={self.options.format!r}, compression={self.options.compression!r} "
                         f"checkpoint files end with {suffix!r}; set ModelCheckpoint(...).FILE_EXTENSION = "
                         f"{suffix!r} (or save to such a path)")

    def _manager_call(self, call: Callable[[], Any]) -> Any:
        """Run a manager method; an error it raises that already reached us through a future is ours to raise
        (once), so the manager's copy is dropped and the call made again."""
        for _ in range(3):
            try:
                return call()
            except CheckpointWriteError as exc:
                with self._lock:
                    if exc not in self._via_future:
                        self._raised.add(exc)
                        raise
        return call()

    def _live(self, directory: _Directory) -> bool:
        return any(not save.discard for save in directory.pending)

    def _landed(self, directory: _Directory, save: _Save, done: Future[SavedCheckpoint | None]) -> None:
        """The manager is done with ``save`` (writer thread): put the file in place, or drop it, or fail it."""
        error = done.exception()
        saved = None if error is not None else done.result()
        with self._lock:
            try:
                if error is None:
                    if saved is None:
                        raise CheckpointWriteError("the manager skipped it")
                    if save.discard:
                        _remove(save.staged)
                    else:
                        if save.staged != save.target:
                            os.replace(save.staged, save.target)
                            if self.options.fsync:
                                fsync_directory(save.target.parent)
                        saved = replace(saved, path=save.target)
                        directory.newest = save.target
            except Exception as exc:
                error = exc
            directory.pending.remove(save)
            if error is not None:
                self._via_future.add(error)
                failure = CheckpointWriteError(f"saving {save.target} failed: {error.__cause__ or error}")
                failure.__cause__ = error.__cause__ or error
                if not save.discard and error not in self._raised:
                    self._errors.append(failure)
                if directory.deferred and not self._live(directory):
                    log.warning("kept %s: no newer checkpoint became durable in %s",
                                ", ".join(map(str, sorted(directory.deferred))), save.target.parent)
                    directory.deferred.clear()
            elif not save.discard:
                for older in directory.deferred - {save.target}:
                    _remove(older)
                    log.info("removed %s now that %s is durable", older, save.target)
                directory.deferred.clear()
        if error is not None:
            save.future.set_exception(failure)
            return
        assert saved is not None
        save.future.set_result(saved)
        if self.on_saved is not None and not save.discard:
            try:
                self.on_saved(saved)
            except Exception as exc:
                callback_error = CheckpointWriteError(f"on_saved failed for {save.target}: {exc}")
                callback_error.__cause__ = exc
                with self._lock:
                    self._errors.append(callback_error)


class _RaiseErrors(Callback):
    def __init__(self, plugin: CheckpointIO) -> None:
        self.plugin = plugin

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.plugin.raise_error()


def encode_objects(obj: Any) -> Any:
    """``obj`` as tensors, scalars, dicts, lists and tuples only (what a ckptio checkpoint holds).

    A dict subclass (Lightning's ``AttributeDict``) becomes a dict; anything else (a namedtuple, a set, a
    ``Path``, a sparse tensor...) is stored as its ``torch.save`` bytes, taken now, and restored by
    :func:`decode_objects`. The caller's objects are never changed.
    """
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        plain = (kind in (torch.Tensor, torch.nn.Parameter) and obj.layout == torch.strided
                 and not obj.is_quantized and obj.device.type in ("cpu", "cuda"))
        return obj if plain else _as_object(obj)
    if kind in _SCALARS:
        return obj
    if isinstance(obj, dict) and all(type(key) in _SCALARS for key in obj):
        items = ((key, encode_objects(value)) for key, value in obj.items())
        return collections.OrderedDict(items) if kind is collections.OrderedDict else dict(items)
    if kind is list or kind is tuple:
        return kind(encode_objects(value) for value in obj)
    return _as_object(obj)


def decode_objects(obj: Any, *, weights_only: bool | None = None) -> Any:
    """Undo :func:`encode_objects`; ``weights_only`` as for ``torch.load`` (``None``: torch's default)."""
    if isinstance(obj, dict):
        if len(obj) == 1 and isinstance(obj.get(_OBJECT_KEY), torch.Tensor):
            data = obj[_OBJECT_KEY].numpy().tobytes()
            kwargs = {} if weights_only is None else {"weights_only": weights_only}
            return torch.load(io.BytesIO(data), **kwargs)  # type: ignore[arg-type]
        return type(obj)((key, decode_objects(value, weights_only=weights_only)) for key, value in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(decode_objects(value, weights_only=weights_only) for value in obj)
    return obj


def _as_object(obj: Any) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return {_OBJECT_KEY: torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)}


def _is_url(path: Any) -> bool:
    return "://" in str(path)


def _local_path(path: Any) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def _remove(path: Path) -> None:
    """Remove a file or a link to one (never what it points to)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        import shutil

        shutil.rmtree(path)
