"""The earlier service's batch queue (`/api/v1/queue/...`), on the jobs store: its page's batch tab
submits, polls status and reads results as it did. A batch is a job; `batch_id` is the job id."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from ...errors import InvalidRequest
from ..deps import services
from .protocol import QueueStatus, QueueSubmit, QueueSubmitted, queue_status
from .router import load, submit, url_maker

router = APIRouter(prefix="/api/v1/queue", tags=["compatibility"])

# Fields of the earlier queue's items that only its speech-recognition operations used.
_ASR_FIELDS = ("num_speakers", "min_speakers", "max_speakers", "return_timestamps")
_OPERATIONS = ("voice_design", "voice_clone", "voice_clone_enhanced", "custom_voice")


def as_job_item(raw: dict[str, Any], index: int) -> dict[str, Any]:
    """An item of the earlier queue as a job item: `operation` is the mode."""
    item = {k: v for k, v in raw.items() if not (k in _ASR_FIELDS and not v)}
    operation = item.pop("operation", None)
    if operation not in _OPERATIONS:
        raise InvalidRequest(
            f"items[{index}].operation must be one of {', '.join(_OPERATIONS)}"
            + (" (speech recognition is not served here)" if operation in ("transcribe", "diarize") else ""),
            field=f"items[{index}].operation",
        )
    instruct = item.get("instruct")
    if isinstance(instruct, list):  # the earlier schema allowed a list; one item speaks one instruct
        if len(instruct) != 1:
            raise InvalidRequest(f"items[{index}].instruct: send one instruct", field=f"items[{index}].instruct")
        item["instruct"] = instruct[0]
    return {"mode": operation, **item}


@router.post("/submit", response_model=QueueSubmitted)
async def queue_submit(body: QueueSubmit, request: Request) -> QueueSubmitted:
    """Queue a batch; poll /queue/status/{batch_id}."""
    items = [as_job_item(raw, i) for i, raw in enumerate(body.items)]
    job = await submit(request, items, {}, body.label, None)
    stored = await asyncio.to_thread(services(request).jobs.items, job.id)
    return QueueSubmitted(batch_id=job.id, total_items=job.total, item_ids=[item.id for item in stored])


@router.get("/status/{batch_id}", response_model=QueueStatus)
async def queue_batch_status(batch_id: str, request: Request, svc=Depends(services)) -> QueueStatus:
    """The batch and each item: queued, processing, done (with its url) or error."""
    job = await load(request, batch_id)
    items = await asyncio.to_thread(svc.jobs.items, job.id)
    return queue_status(job, items, url_maker(request))


@router.get("/results/{batch_id}", response_model=QueueStatus)
async def queue_batch_results(batch_id: str, request: Request, svc=Depends(services)) -> QueueStatus:
    """As status: every item, with the url of each one done."""
    return await queue_batch_status(batch_id, request, svc)
