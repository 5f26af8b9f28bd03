"""File registry routes: upload reference audio once, reuse its file_id; download outputs."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from ..audio.codec_io import DecodedAudio, check_duration, decode_audio
from ..config import Settings
from ..errors import InvalidRequest, PayloadTooLarge
from ..storage.files import FileRecord, sniff_media_type
from .deps import file_url, services

router = APIRouter(prefix="/api/v1/files", tags=["files"])

_CHUNK = 1 << 16


@router.post("/upload", status_code=201)
async def upload(request: Request, file: UploadFile = File(..., description="Reference audio"), svc=Depends(services)):
    """Store reference audio after checking it decodes and its length is usable for cloning."""
    data, audio = await read_reference_upload(request, file, svc.settings, field="file")
    record = await asyncio.to_thread(
        svc.files.put,
        data,
        kind="upload",
        filename=file.filename or "upload",
        # What the bytes are (they decoded as audio above), not what the client said they were.
        media_type=sniff_media_type(data) or file.content_type or "application/octet-stream",
        duration_s=audio.duration_s,
        sample_rate=audio.sample_rate,
    )
    return _described(request, record)


@router.get(
    "/{file_id}",
    responses={200: {"content": {"application/json": {}, "audio/*": {}}, "description": "JSON, or the file"}},
)
async def metadata(
    file_id: str,
    request: Request,
    format_: Literal["json", "audio"] | None = Query(
        None, alias="format", description="json: the metadata, audio: the file, whatever Accept says."
    ),
    svc=Depends(services),
) -> Response:
    """The file's metadata as JSON, or the file itself to a client that asks for audio: an Accept
    header naming audio (`audio/*`, `audio/wav`, ...) or anything (`*/*`, what links, `<audio>` and
    plain fetch() send) that does not rank `application/json` as high or higher. No Accept header, or
    `Accept: application/json`: the metadata. `?format=json` or `?format=audio` decides outright."""
    audio = format_ == "audio" if format_ is not None else asks_for_audio(request.headers.get("accept"))
    if audio:
        response: Response = await content(file_id, svc)
    else:
        record = await asyncio.to_thread(svc.files.get, file_id)  # SQLite: off the event loop
        response = JSONResponse(_described(request, record))
    response.headers["vary"] = "Accept"
    return response


@router.get("/{file_id}/content")
async def content(file_id: str, svc=Depends(services)) -> FileResponse:
    record, path = await asyncio.to_thread(_record_and_path, svc.files, file_id)  # SQLite: off the event loop
    return FileResponse(path, media_type=record.media_type, filename=record.filename)


@router.delete("/{file_id}")
async def delete(file_id: str, svc=Depends(services)):
    await asyncio.to_thread(svc.files.delete, file_id)
    return {"file_id": file_id, "deleted": True}


def _record_and_path(files, file_id: str):
    return files.get(file_id), files.path(file_id)


def _described(request: Request, record: FileRecord) -> dict[str, object]:
    return {
        **record.to_public_dict(),
        "file_id": record.id,
        "url": file_url(request, record.id, expires_at=record.expires_at),
    }


def asks_for_audio(accept: str | None) -> bool:
    """Whether an Accept header asks for audio rather than JSON: it gives audio (`audio/...`) or
    anything (`*/*`) a q above 0 and above that of `application/json` (or a `+json` type). A browser's
    `<audio>` (`audio/webm,...,audio/*;q=0.9,...,*/*;q=0.5`), a link (`text/html,...,*/*;q=0.8`) and
    fetch() or curl (`*/*`) ask for audio; `application/json`, axios' `application/json, text/plain,
    */*` and no header at all do not."""
    if not accept:
        return False
    audio_q = json_q = 0.0
    for part in accept.split(","):
        media, _, params = part.partition(";")
        media = media.strip().lower()
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                q = min(max(q, 0.0), 1.0) if q == q else 0.0  # NaN: 0
        if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
            json_q = max(json_q, q)
        elif media.startswith("audio/") or media == "*/*":
            audio_q = max(audio_q, q)
    return audio_q > 0 and audio_q > json_q


async def read_reference_upload(
    request: Request, file: UploadFile, settings: Settings, *, field: str
) -> tuple[bytes, DecodedAudio]:
    """An uploaded reference clip read within the upload limit, decoded, and its length checked: what
    POST /files/upload stores and the multipart clone routes (api/compat.py) clone from. Errors name
    `field`."""
    s = settings
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > s.max_upload_bytes + 64 * 1024:
        raise PayloadTooLarge(_too_large(s.max_upload_bytes), field=field)
    data = await read_limited(file, s.max_upload_bytes, field=field)
    audio = await asyncio.to_thread(decode_audio, data, field=field, max_duration_s=s.max_ref_audio_s)
    check_duration(audio, min_s=s.min_ref_audio_s, max_s=s.max_ref_audio_s, field=field)
    return data, audio


async def read_limited(file: UploadFile, limit: int, *, field: str = "file") -> bytes:
    """Read at most `limit` bytes; one more means the upload is too large."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await file.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(_too_large(limit), field=field)
        chunks.append(chunk)
    if size == 0:
        raise InvalidRequest(f"{field} is empty: send an audio file (WAV, FLAC, OGG or MP3)", field=field)
    return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"file is larger than this server's limit of {limit / 1024 / 1024:.1f} MB; send a shorter clip"
