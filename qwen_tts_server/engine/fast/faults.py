"""Which errors are the device's (after one, an engine must be rebuilt) and what a request gets then."""

from __future__ import annotations

import torch

from ...errors import EngineFailed

# What a CUDA error says (torch raises them as RuntimeError, or AcceleratorError in recent versions).
# Out of memory is not one: it fails the step's requests and the engine goes on.
_DEVICE_FAULT_MARKERS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error", "illegal memory access")


def is_device_fault(exc: BaseException) -> bool:
    """A fault of the device rather than of a request: after one the engine must be rebuilt."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return any(marker in str(exc) for marker in _DEVICE_FAULT_MARKERS)


def engine_failed(exc: BaseException) -> EngineFailed:
    return EngineFailed(
        f"the GPU failed while running this model ({type(exc).__name__}: {str(exc)[:200]}); "
        "its engine is restarting: retry shortly"
    )


def as_seen_by_client(exc: BaseException) -> BaseException:
    """What a request that `exc` failed reports: a device fault becomes the 503 to retry (`engine_failed`),
    anything else stays itself."""
    return engine_failed(exc) if is_device_fault(exc) else exc


def device_works(device: torch.device) -> bool:
    """Whether `device` still runs work after an error that looks like a fault. A failed graph capture raises
    a CUDA error ("operation not permitted when stream is capturing") that leaves the device usable."""
    try:
        torch.cuda.synchronize(device)
    except Exception:
        return False
    return True
