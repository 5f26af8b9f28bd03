"""bench.repack_wheels: an LZMA-repacked wheel holds the same files and pip still installs it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from bench.repack_wheels import main, repack

FILES = {
    "tinypkg/__init__.py": b"VALUE = 42\n" * 2000,  # compressible: the repack must shrink it
    "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n",
    "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    "tinypkg-1.0.dist-info/RECORD": b"",
}


def make_wheel(folder: Path) -> Path:
    path = folder / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as wheel:
        for name, data in FILES.items():
            wheel.writestr(name, data)
    return path


def test_repacked_wheel_has_the_same_files_and_pip_installs_it(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    before, after = repack(wheel)
    assert after < before
    with zipfile.ZipFile(wheel) as repacked:
        assert [m.compress_type for m in repacked.infolist()] == [zipfile.ZIP_LZMA] * len(FILES)
        assert {name: repacked.read(name) for name in repacked.namelist()} == FILES
    site = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
    done = subprocess.run([*command, str(wheel)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (site / "tinypkg" / "__init__.py").read_bytes() == FILES["tinypkg/__init__.py"]


def test_a_second_repack_leaves_the_wheel_alone_and_small_wheels_are_skipped(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    repack(wheel)
    packed = wheel.read_bytes()
    assert repack(wheel) == (len(packed), len(packed))
    assert wheel.read_bytes() == packed
    (tmp_path / "small").mkdir()
    other = make_wheel(tmp_path / "small")
    assert main([str(other.parent), "--min-mb", "1"]) == 0
    with zipfile.ZipFile(other) as untouched:
        assert {m.compress_type for m in untouched.infolist()} == {zipfile.ZIP_STORED}
