"""File registry routes: upload reference audio once, reuse its file_id; download outputs."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import FileResponse

from ..audio.codec_io import check_duration, decode_audio
from ..errors import InvalidRequest, PayloadTooLarge
from .deps import file_url, services

router = APIRouter(prefix="/api/v1/files", tags=["files"])

_CHUNK = 1 << 16


@router.post("/upload", status_code=201)
async def upload(request: Request, file: UploadFile = File(..., description="Reference audio"), svc=Depends(services)):
    """Store reference audio after checking it decodes and its length is usable for cloning."""
    s = svc.settings
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > s.max_upload_bytes + 64 * 1024:
        raise PayloadTooLarge(_too_large(s.max_upload_bytes), field="file")
    data = await _read_limited(file, s.max_upload_bytes)
    audio = await asyncio.to_thread(decode_audio, data, field="file", max_duration_s=s.max_ref_audio_s)
    check_duration(audio, min_s=s.min_ref_audio_s, max_s=s.max_ref_audio_s, field="file")
    record = await asyncio.to_thread(
        svc.files.put,
        data,
        kind="upload",
        filename=file.filename or "upload",
        media_type=file.content_type or "application/octet-stream",
        duration_s=audio.duration_s,
        sample_rate=audio.sample_rate,
    )
    return {**record.to_public_dict(), "file_id": record.id, "url": file_url(request, record.id)}


@router.get("/{file_id}")
async def metadata(file_id: str, request: Request, svc=Depends(services)):
    record = svc.files.get(file_id)
    return {**record.to_public_dict(), "file_id": record.id, "url": file_url(request, record.id)}


@router.get("/{file_id}/content")
async def content(file_id: str, svc=Depends(services)) -> FileResponse:
    record = svc.files.get(file_id)
    return FileResponse(svc.files.path(file_id), media_type=record.media_type, filename=record.filename)


@router.delete("/{file_id}")
async def delete(file_id: str, svc=Depends(services)):
    await asyncio.to_thread(svc.files.delete, file_id)
    return {"file_id": file_id, "deleted": True}


async def _read_limited(file: UploadFile, limit: int) -> bytes:
    """Read at most `limit` bytes; one more means the upload is too large."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await file.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(_too_large(limit), field="file")
        chunks.append(chunk)
    if size == 0:
        raise InvalidRequest("file is empty: send an audio file (WAV, FLAC, OGG or MP3)", field="file")
    return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"file is larger than this server's limit of {limit / 1024 / 1024:.1f} MB; send a shorter clip"
