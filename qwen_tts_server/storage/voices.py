"""Voice library: named cloning prompts, computed once and kept until deleted.

Metadata lives in the file registry's database (storage.database, table `voices`: SQLite by default,
PostgreSQL for several replicas, which then also share `root`); each voice's prompt (speaker
embedding and reference codes, with its transcript and mode in the header) is a safetensors file,
`<root>/<id>.safetensors`. As in the file registry, writes go blob-first (temp file + fsync +
os.replace, then the row) and deletes row-first, so a crash leaves at most an orphan blob, never a
row without its prompt. Voices never expire.

A voice belongs to its owner: the SHA-256 of the API key that created it, or nobody (`None`) when
the server runs without keys. Every lookup takes the owner and sees only that owner's voices, so
another key's voice is "not found", exactly like one that does not exist. Names are unique per
owner, compared case-insensitively (ASCII letters only, on every backend), as built-in speaker names
are matched.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from qwen_tts_server.engine.types import VoicePrompt
from qwen_tts_server.errors import Conflict, InvalidRequest, NotFound

from .database import autocommit, open_database
from .disk import is_temp_file, stale_files, write_atomically

VoiceMode = Literal["icl", "x_vector"]
VoiceSource = Literal["upload", "file", "url", "path", "design"]
_MODES = frozenset(get_args(VoiceMode))
_SOURCES = frozenset(get_args(VoiceSource))
MAX_NAME_CHARS = 64
# Letters and digits (any script), then also spaces, '-', '_' and '.'; no space at either end.
_NAME_RE = re.compile(r"[^\W_](?:[\w .\-]*[\w.\-])?")
_ID_RE = re.compile(r"voice-[0-9a-f]{32}")
_SUFFIX = ".safetensors"
FORMAT = "qwen-tts-server.voice/1"


class _folded(FunctionElement[str]):
    """A name with its ASCII letters lower-cased, the key names are unique and looked up by. SQLite:
    `name COLLATE NOCASE` (its NOCASE folds ASCII only); PostgreSQL: lower() under the "C" collation,
    which also folds ASCII only, whatever the database's locale."""

    type = sa.Text()
    name = "folded"
    inherit_cache = True


@compiles(_folded)
def _folded_default(element: _folded, compiler: Any, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(_folded, "sqlite")
def _folded_sqlite(element: _folded, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(element.clauses, **kw)} COLLATE NOCASE"


@compiles(_folded, "postgresql")
def _folded_postgresql(element: _folded, compiler: Any, **kw: Any) -> str:
    return f'lower(({compiler.process(element.clauses, **kw)}) COLLATE "C")'


_REAL = sa.Double().with_variant(sa.REAL(), "sqlite")  # epoch seconds: double precision on PostgreSQL

metadata = sa.MetaData()
voices_table = sa.Table(
    "voices",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("mode", sa.Text, nullable=False),
    sa.Column("ref_text", sa.Text),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("description", sa.Text),
    sa.Column("sample_text", sa.Text),
    sa.Column("language", sa.Text),
    sa.Column("audio_sha256", sa.Text, nullable=False),
    sa.Column("duration_s", _REAL),
    sa.Column("created_at", _REAL, nullable=False),
)
_c = voices_table.c
sa.Index("voices_owner_name", _c.owner, _folded(_c.name), unique=True)
_NO_OWNER = ""  # stored for voices made without API keys (NULLs would never collide in UNIQUE)


def is_voice_id(s: str) -> bool:
    return _ID_RE.fullmatch(s) is not None


def check_name(name: str) -> str:
    """The name stripped, or a 422 saying what a name may be."""
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        raise InvalidRequest("name is empty: name the voice (e.g. 'narrator')", field="name")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRequest(
            f"name has {len(name)} characters; a voice name has at most {MAX_NAME_CHARS}", field="name"
        )
    if _NAME_RE.fullmatch(name) is None:
        raise InvalidRequest(
            f"name {_quote(name)} has characters a voice name cannot have: use letters, digits, spaces, "
            "'-', '_' and '.', starting with a letter or digit",
            field="name",
        )
    if name.lower().startswith("voice-") and is_voice_id(name.lower()):
        raise InvalidRequest("name looks like a voice id (voice-<32 hex digits>): choose another name", field="name")
    return name


def _quote(name: str) -> str:
    return repr(name if len(name) <= 64 else name[:64] + "...")


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class VoiceRecord:
    id: str
    owner: str | None  # SHA-256 (hex) of the API key that created it; None without keys
    name: str
    model: str  # the Base checkpoint the prompt was computed with: it only fits that model
    mode: VoiceMode  # icl: reference codes + transcript; x_vector: the speaker embedding alone
    ref_text: str | None
    source: VoiceSource
    description: str | None  # designed voices: the description the VoiceDesign model spoke
    sample_text: str | None  # designed voices: what it said (also the ICL transcript)
    language: str | None
    audio_sha256: str  # of the reference audio's bytes: the voice-prompt cache key
    duration_s: float | None
    created_at: float

    @property
    def x_vector_only(self) -> bool:
        return self.mode == "x_vector"

    def to_public_dict(self) -> dict[str, object]:
        """What clients see (the owner hash stays on the server)."""
        return {
            "id": self.id,
            "name": self.name,
            "model": self.model,
            "mode": self.mode,
            "ref_text": self.ref_text,
            "source": self.source,
            "description": self.description,
            "sample_text": self.sample_text,
            "language": self.language,
            "duration_s": self.duration_s,
            "created_at": self.created_at,
            "created_at_iso": _iso(self.created_at),
        }


def _record(row: sa.Row[Any]) -> VoiceRecord:
    values = dict(row._mapping)
    values["owner"] = values["owner"] or None
    return VoiceRecord(**values)


class VoiceStore:
    def __init__(self, root: Path, database_url: str, clock: Callable[[], float] = time.time) -> None:
        """`root`: the prompt folder (replicas sharing `database_url` must share it too)."""
        self.root = Path(root)
        self._clock = clock
        self.root.mkdir(parents=True, exist_ok=True)
        self._engine = open_database(database_url, metadata)  # shared pool: nothing of ours to close
        self._reads = autocommit(self._engine)
        for path in stale_files(self.root, is_temp_file):  # what a crash mid-write left behind
            path.unlink(missing_ok=True)

    # --- writes ---

    def create(
        self,
        *,
        name: str,
        owner: str | None,
        model: str,
        prompt: VoicePrompt,
        audio_sha256: str,
        source: VoiceSource,
        ref_text: str | None = None,
        x_vector_only: bool = False,
        description: str | None = None,
        sample_text: str | None = None,
        language: str | None = None,
        duration_s: float | None = None,
    ) -> VoiceRecord:
        """Store a voice; Conflict (409) if this owner already has one by that name."""
        name = check_name(name)
        if source not in _SOURCES:
            raise ValueError(f"source must be one of {sorted(_SOURCES)}, not {source!r}")
        mode: VoiceMode = "x_vector" if x_vector_only or not ref_text else "icl"
        self.ensure_free(name, owner)  # before the blob is written: the common case, said early
        record = VoiceRecord(
            id=f"voice-{uuid.uuid4().hex}",
            owner=owner or None,
            name=name,
            model=model,
            mode=mode,
            ref_text=ref_text,
            source=source,
            description=description,
            sample_text=sample_text,
            language=language,
            audio_sha256=audio_sha256,
            duration_s=None if duration_s is None else round(float(duration_s), 6),
            created_at=self._clock(),
        )
        write_atomically(self._blob_path(record.id), _serialize(record, prompt))
        try:
            with self._engine.begin() as conn:
                conn.execute(voices_table.insert().values(**(asdict(record) | {"owner": owner or _NO_OWNER})))
        except sa.exc.IntegrityError:  # a concurrent create (here or on another replica) took the name
            self._blob_path(record.id).unlink(missing_ok=True)
            raise self._taken(name) from None
        except BaseException:
            self._blob_path(record.id).unlink(missing_ok=True)
            raise
        return record

    def delete(self, name_or_id: str, owner: str | None) -> VoiceRecord:
        record = self.get(name_or_id, owner)
        with self._engine.begin() as conn:
            deleted = conn.execute(voices_table.delete().where(_c.id == record.id)).rowcount
        if not deleted:  # deleted concurrently
            raise self._not_found(name_or_id)
        self._blob_path(record.id).unlink(missing_ok=True)
        return record

    # --- reads ---

    def find(self, name_or_id: str, owner: str | None) -> VoiceRecord | None:
        """This owner's voice by name (any case) or id; None if there is none (or it is another's)."""
        key = name_or_id.strip() if isinstance(name_or_id, str) else ""
        if not key or len(key) > MAX_NAME_CHARS:
            return None
        match = _c.id == key if is_voice_id(key) else _folded(_c.name) == _folded(sa.literal(key, sa.Text))
        with self._reads.connect() as conn:
            row = conn.execute(sa.select(voices_table).where(_c.owner == (owner or _NO_OWNER), match)).first()
        return None if row is None else _record(row)

    def get(self, name_or_id: str, owner: str | None) -> VoiceRecord:
        record = self.find(name_or_id, owner)
        if record is None:
            raise self._not_found(name_or_id)
        return record

    def ensure_free(self, name: str, owner: str | None) -> None:
        if self.find(name, owner) is not None:
            raise self._taken(name)

    def list(self, owner: str | None) -> list[VoiceRecord]:
        """This owner's voices, oldest first."""
        query = sa.select(voices_table).where(_c.owner == (owner or _NO_OWNER)).order_by(_c.created_at, _c.id)
        with self._reads.connect() as conn:
            rows = conn.execute(query).all()
        return [_record(row) for row in rows]

    def load_prompt(self, voice_id: str, device: str = "cpu") -> VoicePrompt:
        """The stored prompt, its tensors on `device` (in the dtype they were computed in)."""
        from safetensors.torch import load_file

        path = self._blob_path(voice_id)
        try:
            tensors = load_file(str(path), device=device)
        except FileNotFoundError:
            raise NotFound(f"voice {voice_id!r} has no stored prompt; create it again") from None
        return VoicePrompt(speaker_embedding=tensors["speaker_embedding"], ref_code=tensors.get("ref_code"))

    def path(self, voice_id: str) -> Path:
        return self._blob_path(voice_id)

    # --- internals ---

    @staticmethod
    def _not_found(name_or_id: str) -> NotFound:
        return NotFound(
            f"voice {_quote(str(name_or_id))} does not exist; GET /api/v1/voices lists yours", field="voice"
        )

    @staticmethod
    def _taken(name: str) -> Conflict:
        return Conflict(
            f"a voice named {_quote(name)} already exists: choose another name, or delete it first", field="name"
        )

    def _blob_path(self, voice_id: str) -> Path:
        if not is_voice_id(voice_id):
            raise ValueError(f"not a voice id: {voice_id!r}")
        return self.root / f"{voice_id}{_SUFFIX}"


def _serialize(record: VoiceRecord, prompt: VoicePrompt) -> bytes:
    """safetensors bytes: the prompt's tensors (on the CPU), and in the header what the file is."""
    from safetensors.torch import save

    tensors = {"speaker_embedding": prompt.speaker_embedding.detach().to("cpu").contiguous()}
    if prompt.ref_code is not None:
        tensors["ref_code"] = prompt.ref_code.detach().to("cpu").contiguous()
    metadata = {
        "format": FORMAT,
        "id": record.id,
        "name": record.name,
        "model": record.model,
        "mode": record.mode,
        "x_vector_only": "true" if record.x_vector_only else "false",
        "ref_text": record.ref_text or "",
        "audio_sha256": record.audio_sha256,
    }
    return save(tensors, metadata=metadata)
