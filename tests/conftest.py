"""Session-wide fixtures: the tiny random checkpoints every model test runs on; a fresh PostgreSQL database
and Redis database number for tests that need one (tests/services.py)."""

from __future__ import annotations

import gc
import os
import subprocess

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spin-waiting
# against another busy process made a decode step 100x slower (2.6 s instead of 26 ms a frame).
# The environment variable also reaches server subprocesses started by tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from qwen_tts_server.testing.tiny_models import build_all  # noqa: E402

from . import services  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def unfrozen_collector() -> Iterator[None]:
    """A model load freezes every object alive out of the garbage collector's scans (collector.py): in a
    server that is the loaded model, in this process it is every earlier test's apps and clients too. Hand
    them back to the collector after each test."""
    yield
    gc.unfreeze()


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic garbage collector off for a test: one that times tens of milliseconds (a full collection of a
    test session's objects takes 0.3-0.4 s, on whichever thread happens to allocate), or one that checks what
    reference counting alone frees. Earlier tests' garbage is collected first, so it is not what the checks see."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All five published model names as tiny checkpoints (seed 0, weights-only EOS), built once."""
    models_dir = tmp_path_factory.mktemp("models")
    build_all(models_dir)
    return models_dir


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (tests/services.py), dropped after; skips without one."""
    from qwen_tts_server.storage.database import close_databases

    with services.postgres_url() as url:
        yield url
        close_databases()  # our pools' connections to it, before it is dropped


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An empty Redis database number for this test (tests/services.py), flushed after; skips without Redis."""
    with services.redis_url() as url:
        yield url


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path, int], Path]]:
    """`small_disk(folder, kib)` mounts a tmpfs of that size at `folder`: a real filesystem that fills up, so
    writes fail with ENOSPC as on a full disk. Needs root (the README's test command runs as root); a test
    that cannot mount one fails, it does not skip. Unmounted after the test."""
    mounted: list[Path] = []

    def mount(folder: Path, kib: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.fail(f"could not mount a {kib} KiB tmpfs at {folder} (run the tests as root): {done.stderr}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)
