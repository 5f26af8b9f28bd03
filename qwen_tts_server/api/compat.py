"""What clients of the earlier `voice-cloning` service (its web page and scripts) need beyond the
native API, so they work unchanged (README: "Clients of the earlier service"):

- `POST /api/v1/voice-clone-file` and `/api/v1/voice-clone-enhanced-file`: cloning from a multipart
  upload (`text`, `ref_audio` the file, optional `ref_text`, `language`, `custom_id`, `temperature`;
  any other native option may be sent as a form field too). The clip is checked as
  `POST /api/v1/files/upload` checks it, then cloned on the native clone path (api/tts.py) without
  being stored.
- `POST /api/v1/voice-clone-enhanced`: the JSON clone request of `/api/v1/voice-clone`.

On these routes an item without `ref_text` is cloned from the speaker embedding alone (x-vector), as
the earlier service did, and results carry `items[].audio_base64` unless the request sends
`return_audio_inline: false` (its clients play that). The earlier service's "enhanced" pipeline
(denoising, resampling) is not reproduced: the enhanced routes clone as the plain ones do, and say so
in `warnings`.

CORS (`QTTS_CORS_ORIGINS`) is installed here too: the earlier service's page may be served from
another origin. The batch tab's queue (`/api/v1/queue/...`) is the jobs module's, not this one's.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic import ValidationError

from ..audio.sources import ReferenceAudio, content_key
from ..config import Settings
from .deps import services
from .files import read_reference_upload
from .json_body import OffLoopJSONRoute
from .schemas import SynthesisResponse, VoiceCloneRequest
from .tts import STREAM_RESPONSES, clone

router = APIRouter(prefix="/api/v1", tags=["compatibility"], route_class=OffLoopJSONRoute)

# The name of the uploaded clip in the clone request built from the form (never a client's string:
# the form's `ref_audio` is the file itself).
UPLOADED = "upload:ref_audio"
NOT_ENHANCED = (
    "no enhancement pipeline on this server (the earlier service denoised and resampled here): "
    "cloned as /api/v1/voice-clone does"
)
# Form fields the multipart routes declare; every other field goes to the clone request as it is.
_DECLARED = frozenset({"text", "ref_audio", "ref_text", "language", "custom_id", "temperature"})
# Response headers a page on another origin may read.
EXPOSED_HEADERS = ["x-request-id", "content-disposition", "retry-after"]

_ROUTE = {"response_model": SynthesisResponse, "response_model_exclude_none": True, "responses": STREAM_RESPONSES}


@router.post("/voice-clone-enhanced", **_ROUTE)
async def voice_clone_enhanced(body: VoiceCloneRequest, request: Request, svc=Depends(services)):
    """`/api/v1/voice-clone` for clients of the earlier service: without `ref_text`, x-vector cloning;
    results carry audio_base64 unless `return_audio_inline: false`. No enhancement is applied."""
    return await clone(request, body, svc, without_transcript="xvector", inline_default=True, notes=[NOT_ENHANCED])


@router.post("/voice-clone-file", **_ROUTE)
@router.post("/voice-clone-enhanced-file", **_ROUTE)
async def voice_clone_file(
    request: Request,
    text: str = Form(..., description="The text to speak."),
    ref_audio: UploadFile = File(..., description="The reference clip (WAV, FLAC, OGG or MP3)."),
    ref_text: str | None = Form(None, description="Transcript of ref_audio; without it: x-vector cloning."),
    language: str = Form("auto", description="auto, a language name or ISO code."),
    custom_id: str | None = Form(None, description="Echoed back on the item."),
    temperature: float | None = Form(None, description="Sampling temperature; default: the model's."),
    svc=Depends(services),
):
    """Clone a voice from an uploaded clip in one call (the earlier service's clone button). Any native
    option (`model`, `seed`, `response_format`, `return_audio_inline`, ...) may be sent as a form
    field too; unknown fields are named in `warnings`. `-enhanced-file` is the earlier service's name
    for its enhanced pipeline, not reproduced here: the clip is cloned as it is, and a warning says so."""
    notes = [NOT_ENHANCED] if request.url.path.endswith("/voice-clone-enhanced-file") else []
    return await _clone_upload(request, svc, text, ref_audio, ref_text, language, custom_id, temperature, notes)


async def _clone_upload(
    request: Request,
    svc,
    text: str,
    upload: UploadFile,
    ref_text: str | None,
    language: str,
    custom_id: str | None,
    temperature: float | None,
    notes: list[str],
):
    form = await request.form()  # already parsed for the parameters above: this is that same form
    fields: dict[str, object] = {}
    for key in form:
        if key not in _DECLARED:
            values = form.getlist(key)
            fields[key] = values[0] if len(values) == 1 else values
    fields |= {"text": text, "ref_audio": UPLOADED, "language": language}
    for key, value in (("ref_text", ref_text), ("custom_id", custom_id), ("temperature", temperature)):
        if value is not None:
            fields[key] = value
    try:
        body = VoiceCloneRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    data, audio = await read_reference_upload(request, upload, svc.settings, field="ref_audio")
    reference = ReferenceAudio(await asyncio.to_thread(content_key, data), audio=audio, source="upload")
    return await clone(
        request,
        body,
        svc,
        references={UPLOADED: reference},
        without_transcript="xvector",
        inline_default=True,
        notes=notes,
    )


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Let pages on the origins in QTTS_CORS_ORIGINS (`*`: any) call the API, downloads included.
    Call it after every other middleware is added: the last added runs outermost, so preflights are
    answered before the API-key check (a preflight carries no key) and every response, errors and
    401s included, gets the headers. No credentials mode: keys travel in headers, not cookies."""
    origins = [origin.rstrip("/") for origin in settings.cors_origins]
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if "*" in origins else origins,
        allow_methods=["GET", "HEAD", "POST", "DELETE"],
        allow_headers=["*"],
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
