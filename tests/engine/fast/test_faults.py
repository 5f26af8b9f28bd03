"""Device faults against request failures (qwen_tts_server/engine/fast/faults.py); an engine stopped by one is
tested through the server in tests/api/test_faults.py."""

from __future__ import annotations

import torch

from qwen_tts_server.engine.fast.faults import is_device_fault


def test_device_faults_are_told_from_request_failures():
    """A CUDA error stops the engine for good (it is rebuilt); out of memory or a bad value fails only the step."""
    assert is_device_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fault(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    assert not is_device_fault(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_device_fault(ValueError("prompt of 5000 positions leaves no room in max_len 4096"))
