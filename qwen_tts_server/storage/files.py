"""File registry: uploaded reference audio and generated outputs, with a TTL.

Metadata lives in the shared database (storage.database: SQLite by default, PostgreSQL for several
replicas, which then also share `root`), blobs as plain files named by id under `root`. Writes go
blob-first (temp file + fsync + os.replace, then the row) and deletes go row-first, so a crash
can leave at most an orphan blob, which `cleanup_expired` removes later; it never leaves a row
whose blob is missing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import sqlalchemy as sa

from qwen_tts_server.errors import NotFound

from .database import autocommit, open_database
from .disk import is_temp_file, stale_files, write_atomically

FileKind = Literal["upload", "output"]
_KINDS = frozenset(get_args(FileKind))
_ID_RE = re.compile(r"file-[0-9a-f]{32}")

# Epoch seconds and sizes: double precision and 64 bits on PostgreSQL, REAL and INTEGER on SQLite.
_REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
_BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_SQL_BATCH = 500  # ids per IN (...) list: under every backend's bound-parameter limit

metadata = sa.MetaData()
files_table = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("media_type", sa.Text, nullable=False),
    sa.Column("size_bytes", _BIGINT, nullable=False),
    sa.Column("created_at", _REAL, nullable=False),
    sa.Column("expires_at", _REAL, nullable=False),
    sa.Column("duration_s", _REAL),
    sa.Column("sample_rate", sa.Integer),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Index("files_expires_at", "expires_at"),
)


def is_file_id(s: str) -> bool:
    return _ID_RE.fullmatch(s) is not None


def sniff_media_type(data: bytes) -> str | None:
    """The audio media type of these bytes from their first bytes, or None if they are none of ours:
    RIFF/WAVE (or RF64, WAVE over 4 GB) is audio/wav, fLaC audio/flac, OggS audio/ogg, an ID3 tag or
    an MPEG audio frame sync audio/mpeg. Uploads are stored as what they are, not as what the client
    said (browsers often send application/octet-stream)."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[:4] == b"fLaC":
        return "audio/flac"
    if head[:4] == b"OggS":
        return "audio/ogg"
    if head[:3] == b"ID3":
        return "audio/mpeg"
    # MPEG audio frame header: 11 sync bits, a version other than "reserved" (01), a layer other than
    # "reserved" (00), a bitrate index other than 1111 and a sample rate index other than 11.
    if len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        version, layer = (head[1] >> 3) & 0b11, (head[1] >> 1) & 0b11
        bitrate, rate = head[2] >> 4, (head[2] >> 2) & 0b11
        if version != 0b01 and layer != 0b00 and bitrate != 0b1111 and rate != 0b11:
            return "audio/mpeg"
    return None


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _quote(file_id: str) -> str:
    """Echo a client-supplied id back without letting a huge or odd string into the message."""
    return repr(file_id if len(file_id) <= 64 else file_id[:64] + "...")


def _clean_filename(name: str) -> str:
    """Keep only the base name, printable, bounded: it ends up in Content-Disposition headers."""
    base = re.split(r"[\\/]", name)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] or "file"


@dataclass(frozen=True)
class FileRecord:
    id: str
    kind: FileKind
    filename: str
    media_type: str
    size_bytes: int
    created_at: float
    expires_at: float
    duration_s: float | None
    sample_rate: int | None
    sha256: str

    def to_public_dict(self) -> dict[str, object]:
        body: dict[str, object] = asdict(self)
        body["created_at_iso"] = _iso(self.created_at)
        body["expires_at_iso"] = _iso(self.expires_at)
        return body


class FileRegistry:
    def __init__(
        self,
        root: Path,
        database_url: str,
        default_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`root`: the blob folder (replicas sharing `database_url` must share it too)."""
        if default_ttl_s <= 0:
            raise ValueError("default_ttl_s must be > 0")
        self.root = Path(root)
        self.default_ttl_s = default_ttl_s
        self._clock = clock
        self.root.mkdir(parents=True, exist_ok=True)
        self._engine = open_database(database_url, metadata)  # shared pool: nothing of ours to close
        self._reads = autocommit(self._engine)

    # --- writes ---

    def put(
        self,
        data: bytes,
        *,
        kind: FileKind,
        filename: str,
        media_type: str,
        duration_s: float | None = None,
        sample_rate: int | None = None,
        ttl_s: float | None = None,
    ) -> FileRecord:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {sorted(_KINDS)}, not {kind!r}")
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError("ttl_s must be > 0")
        file_id = f"file-{uuid.uuid4().hex}"
        write_atomically(self._blob_path(file_id), data)
        now = self._clock()
        record = FileRecord(
            id=file_id,
            kind=kind,
            filename=_clean_filename(filename),
            media_type=media_type,
            size_bytes=len(data),
            created_at=now,
            expires_at=now + ttl,
            duration_s=None if duration_s is None else float(duration_s),
            sample_rate=None if sample_rate is None else int(sample_rate),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        try:
            with self._engine.begin() as conn:
                conn.execute(files_table.insert().values(**asdict(record)))
        except BaseException:
            self._blob_path(file_id).unlink(missing_ok=True)
            raise
        return record

    def delete(self, file_id: str) -> None:
        """Remove a file, expired or not; NotFound if the id was never stored (or already gone)."""
        if not is_file_id(file_id):
            raise self._not_found(file_id)
        with self._engine.begin() as conn:
            deleted = conn.execute(files_table.delete().where(files_table.c.id == file_id)).rowcount
        if not deleted:
            raise self._not_found(file_id)
        self._blob_path(file_id).unlink(missing_ok=True)

    def cleanup_expired(self) -> int:
        """Delete expired files; also sweep stale temp files and row-less blobs. Returns the files this
        call removed (replicas cleaning up at the same moment do not count a file twice)."""
        now = self._clock()
        removed = 0
        with self._engine.begin() as conn:
            ids = conn.execute(sa.select(files_table.c.id).where(files_table.c.expires_at <= now)).scalars().all()
            for batch in _batches(ids):
                removed += conn.execute(files_table.delete().where(files_table.c.id.in_(batch))).rowcount
        for file_id in ids:  # every one of these rows is gone now, whoever deleted it
            self._blob_path(file_id).unlink(missing_ok=True)
        self._sweep_orphans()
        return removed

    # --- reads ---

    def get(self, file_id: str) -> FileRecord:
        record = self._lookup(file_id)
        if record is None:
            raise self._not_found(file_id)
        if record.expires_at <= self._clock():
            raise NotFound(f"file {_quote(file_id)} expired at {_iso(record.expires_at)}; upload it again")
        return record

    def path(self, file_id: str) -> Path:
        self.get(file_id)
        blob = self._blob_path(file_id)
        if not blob.is_file():
            raise NotFound(f"file {_quote(file_id)} is missing from storage; upload it again")
        return blob

    def read_bytes(self, file_id: str) -> bytes:
        blob = self.path(file_id)
        try:
            return blob.read_bytes()
        except FileNotFoundError:  # deleted or cleaned up between path() and the read
            raise self._not_found(file_id) from None

    def list(self, kind: FileKind | None = None) -> list[FileRecord]:
        """Unexpired files, oldest first."""
        query = sa.select(files_table).where(files_table.c.expires_at > self._clock())
        if kind is not None:
            query = query.where(files_table.c.kind == kind)
        with self._reads.connect() as conn:
            rows = conn.execute(query.order_by(files_table.c.created_at, files_table.c.id)).all()
        return [FileRecord(**row._mapping) for row in rows]

    # --- internals ---

    def _lookup(self, file_id: str) -> FileRecord | None:
        if not is_file_id(file_id):
            return None
        with self._reads.connect() as conn:
            row = conn.execute(sa.select(files_table).where(files_table.c.id == file_id)).first()
        return None if row is None else FileRecord(**row._mapping)

    @staticmethod
    def _not_found(file_id: str) -> NotFound:
        return NotFound(f"file {_quote(file_id)} does not exist; upload it again or check the id")

    def _blob_path(self, file_id: str) -> Path:
        return self.root / file_id

    def _sweep_orphans(self) -> None:
        stale: list[str] = []
        for path in stale_files(self.root, lambda name: is_temp_file(name) or is_file_id(name)):
            if is_temp_file(path.name):
                path.unlink(missing_ok=True)
            else:
                stale.append(path.name)
        # Old blobs: one query a batch (not one per blob) for those that still have a row.
        for batch in _batches(stale):
            with self._reads.connect() as conn:
                kept = set(conn.execute(sa.select(files_table.c.id).where(files_table.c.id.in_(batch))).scalars())
            for name in batch:
                if name not in kept:
                    (self.root / name).unlink(missing_ok=True)


def _batches(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _SQL_BATCH):
        yield items[start : start + _SQL_BATCH]
