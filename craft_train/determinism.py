"""``--deterministic``: the switches that make CUDA training bit-reproducible, set for one run only.

On the CPU our training is bit-identical across resumes without them. On CUDA, cuDNN autotuning
(``cudnn.benchmark``), nondeterministic cuDNN/cuBLAS kernels and atomics in backward passes make two identical runs
diverge (measured on an H200: 322 of 436 tensors differed after 20 steps); with these switches 10 steps + resume +
10 steps equalled 20 straight steps bit for bit.

The switches are process-global, so :func:`deterministic_mode` restores them when the run ends: a test (or a
notebook) that calls ``train()`` twice must not inherit the first run's settings.

One switch cannot be undone or applied late: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when the process makes its
first cuBLAS handle. A run with ``--deterministic`` started in a process that already ran a CUDA matmul (a notebook,
or a second ``train()`` after one without the flag) fails at its first matmul; it warns when it starts on a
process that has used CUDA. Set the variable before Python starts to avoid it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["CUBLAS_WORKSPACE_CONFIG", "deterministic_mode", "resume_note"]

CUBLAS_WORKSPACE_CONFIG = ":4096:8"
"""cuBLAS needs a fixed workspace configuration to be deterministic (CUDA >= 10.2); ``:16:8`` also works but
may be slower. It is read when cuBLAS creates its first handle, so it must be set before any CUDA matmul."""

_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """With ``enabled``, run the body with deterministic cuDNN/cuBLAS/PyTorch algorithms; restore the previous
    settings afterwards. Without it, leave everything as it is (a user's own settings included).

    Enter it before the model is built and before anything touches CUDA (the cuBLAS variable is read once).
    """
    if not enabled:
        yield
        return
    saved: dict[str, Any] = {
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if saved["cublas"] not in _CUBLAS_DETERMINISTIC:
        if torch.cuda.is_initialized():
            # cuBLAS reads the variable once, when this process made its first handle; PyTorch then checks it
            # at every cuBLAS call under deterministic algorithms, and the next matmul would raise.
            warnings.warn(
                "--deterministic was switched on after this process had already used CUDA: if a cuBLAS call ran "
                f"before, the next one raises about CUBLAS_WORKSPACE_CONFIG. Set CUBLAS_WORKSPACE_CONFIG="
                f"{CUBLAS_WORKSPACE_CONFIG} in the environment before starting Python, or train in a fresh process",
                RuntimeWarning, stacklevel=3)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # Not warn_only: an operation without a deterministic kernel must stop the run rather than silently break
    # the bit-exactness the user asked for. CRAFT's decoder upsamples with F.interpolate(bilinear), whose CUDA
    # backward uses atomics; under this switch PyTorch routes it through a deterministic (slower) decomposition.
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic = saved["cudnn_deterministic"]
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]
        torch.use_deterministic_algorithms(saved["algorithms"], warn_only=saved["warn_only"])
        if saved["cublas"] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved["cublas"]


def resume_note(saved_config: dict[str, Any], deterministic: bool) -> str | None:
    """What a resume should say when ``--deterministic`` differs from the checkpoint's run, else ``None``.

    A warning, not a refusal: dropping (or adding) the flag changes which kernels run, so the resumed run is no
    longer bit-identical to an uninterrupted one, but it is the same experiment (same data order, weights,
    optimizer and schedule) and trains correctly. Checkpoints written before the flag existed count as
    non-deterministic runs.
    """
    before = bool(saved_config.get("deterministic", False))
    if before == deterministic:
        return None
    if before:
        return ("warning: the checkpoint comes from a --deterministic run and this run is not: training continues "
                "correctly, but on CUDA it is no longer bit-identical to an uninterrupted run (add --deterministic "
                "to keep that)")
    return ("note: this run is --deterministic and the checkpoint's run was not: from here on the run is "
            "reproducible, but the steps before the checkpoint were not")
