"""Bodies of the jobs API (`/api/v1/jobs`) and of the earlier service's queue (`/api/v1/queue`), and
the views of a stored job both are built from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...jobs.store import Item, Job, JobState
from ..validation import SpeechText

UrlOf = Callable[[str], str | None]  # file id -> download URL (None: no URL can be given)


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "example": {
                "options": {"mode": "custom_voice", "speaker": "vivian", "response_format": "mp3"},
                "items": [{"text": "Chapter one.", "custom_id": "ch1"}, {"text": "Chapter two.", "custom_id": "ch2"}],
                "label": "audiobook",
            }
        },
    )

    items: list[dict[str, Any]] = Field(
        description="One native synthesis request per item, for one text: `mode` (custom_voice, voice_design, "
        "voice_clone) and that endpoint's fields (text, speaker, instruct, voice, ref_audio, ref_text, language, "
        "custom_id, model, response_format, sampling options)."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Fields every item gets unless it sets them.")
    label: SpeechText | None = Field(None, max_length=200)
    webhook_url: SpeechText | None = Field(
        None,
        max_length=2000,
        description="POSTed the finished job (JSON) once it ends; a public http(s) URL.",
    )


class ProgressView(BaseModel):
    total: int
    queued: int
    running: int
    done: int
    failed: int
    cancelled: int
    audio_s: float = Field(description="Seconds of audio generated so far.")
    eta_s: float | None = Field(description="Estimated seconds until the job ends (None until an item ends).")


class ItemView(BaseModel):
    index: int
    item_id: str
    custom_id: str | None = None
    mode: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    attempts: int
    file_id: str | None = None
    url: str | None = None
    duration_s: float | None = None
    finish_reason: str | None = None
    error: str | None = None


class JobView(BaseModel):
    id: str
    label: str | None = None
    status: Literal["queued", "running", "completed", "partial", "failed", "cancelled"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: ProgressView
    items: list[ItemView] | None = None
    events_url: str
    archive_url: str


def item_view(item: Item, url_of: UrlOf) -> ItemView:
    return ItemView(
        index=item.idx,
        item_id=item.id,
        custom_id=item.custom_id,
        mode=item.mode,
        status=item.state.value,
        attempts=item.attempts,
        file_id=item.file_id,
        url=url_of(item.file_id) if item.file_id else None,
        duration_s=item.duration_s,
        finish_reason=item.finish_reason,
        error=item.error,
    )


def job_view(job: Job, items: list[Item] | None, url_of: UrlOf, base: str) -> JobView:
    p = job.progress
    return JobView(
        id=job.id,
        label=job.label,
        status=job.state.value,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        progress=ProgressView(
            total=p.total,
            queued=p.queued,
            running=p.running,
            done=p.done,
            failed=p.failed,
            cancelled=p.cancelled,
            audio_s=p.audio_s,
            eta_s=p.eta_s,
        ),
        items=None if items is None else [item_view(item, url_of) for item in items],
        events_url=f"{base}/api/v1/jobs/{job.id}/events",
        archive_url=f"{base}/api/v1/jobs/{job.id}/archive",
    )


# ----- the earlier service's queue -----
class QueueSubmit(BaseModel):
    model_config = ConfigDict(extra="allow")

    items: list[dict[str, Any]]
    label: SpeechText | None = Field(None, max_length=200)


class QueueSubmitted(BaseModel):
    batch_id: str
    total_items: int
    item_ids: list[str]
    status: str = "queued"


class QueueItemStatus(BaseModel):
    item_id: str
    custom_id: str | None = None
    status: Literal["queued", "processing", "done", "error"]
    url: str | None = None
    error: str | None = None


class QueueStatus(BaseModel):
    batch_id: str
    label: str | None = None
    status: Literal["queued", "processing", "partial", "completed", "error"]
    total: int
    completed: int
    failed: int
    items: list[QueueItemStatus]


_QUEUE_ITEM_STATUS = {"queued": "queued", "running": "processing", "done": "done", "failed": "error"}
_QUEUE_JOB_STATUS = {
    JobState.QUEUED: "queued",
    JobState.RUNNING: "processing",
    JobState.COMPLETED: "completed",
    JobState.PARTIAL: "partial",
    JobState.FAILED: "error",
}


def queue_status(job: Job, items: list[Item], url_of: UrlOf) -> QueueStatus:
    """A job as the earlier service's status call reports a batch. Cancelled items are errors; a
    cancelled job is `partial` when some items were done, else `error` (its page stops polling on
    either)."""
    state = job.state
    cancelled = "partial" if job.progress.done else "error"
    status = cancelled if state is JobState.CANCELLED else _QUEUE_JOB_STATUS[state]
    return QueueStatus(
        batch_id=job.id,
        label=job.label,
        status=status,
        total=job.total,
        completed=job.progress.done,
        failed=job.progress.failed + job.progress.cancelled,
        items=[
            QueueItemStatus(
                item_id=item.id,
                custom_id=item.custom_id,
                status=_QUEUE_ITEM_STATUS.get(item.state.value, "error"),
                url=url_of(item.file_id) if item.file_id else None,
                error=item.error,
            )
            for item in items
        ],
    )
