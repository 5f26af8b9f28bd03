"""Recompress large wheels with LZMA in place, so the wheels a device call carries fit its 64 MiB.

A wheel is a zip archive; its RECORD lists the hashes of the files it unpacks to, not of their compressed
bytes, and pip reads LZMA members through Python's zipfile. So a wheel repacked member by member, LZMA in place
of deflate, installs the same files: PyAV's wheel goes from 35.8 to 26.8 MB. bench/fetch_device_wheels.sh runs
it on every group it fetched.

    python -m bench.repack_wheels DIR [DIR ...] [--min-mb 1]
"""

from __future__ import annotations

import argparse
import os
import zipfile
from pathlib import Path


def repack(path: Path) -> tuple[int, int]:
    """`path` recompressed with LZMA (member names, order and dates kept); returns its sizes before and after.
    A wheel already all LZMA is left as it is."""
    before = path.stat().st_size
    with zipfile.ZipFile(path) as source:
        members = source.infolist()
        if all(m.compress_type == zipfile.ZIP_LZMA for m in members):
            return before, before
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as target:
            for member in members:
                data = source.read(member)
                member.compress_type = zipfile.ZIP_LZMA
                target.writestr(member, data)
    os.replace(tmp, path)  # a new file: hard links to the old one (carry folders) keep the old bytes
    return before, path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--min-mb", type=float, default=1.0, help="leave smaller wheels as they are")
    args = p.parse_args(argv)
    total_before = total_after = 0
    for wheel in sorted(w for d in args.dirs for w in d.glob("*.whl")):
        if wheel.stat().st_size < args.min_mb * 1e6:
            continue
        before, after = repack(wheel)
        total_before, total_after = total_before + before, total_after + after
        print(f"{wheel.name}: {before / 1e6:.1f} -> {after / 1e6:.1f} MB")
    print(f"repacked: {total_before / 1e6:.1f} -> {total_after / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
