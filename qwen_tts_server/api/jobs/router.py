"""Batch jobs: submit many items at once, watch progress (JSON or server-sent events), fetch each
result or one archive of all, cancel. Jobs belong to the API key that submitted them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, BackgroundTasks, Depends, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from ...errors import InvalidRequest, NotFound, Overloaded, QueueUnavailable
from ...jobs.items import check_items
from ...jobs.store import Item, Job
from ...jobs.webhook import check_webhook_url, send_webhook
from ...storage.disk import disk_full_as_storage_full
from ..deps import file_url, owner, services
from ..json_body import OffLoopJSONRoute
from .protocol import JobCreate, JobView, item_view, job_view

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"], route_class=OffLoopJSONRoute)

EVENT_POLL_S = 0.25  # how often an event stream looks at the store
EVENT_HEARTBEAT_S = 0.5  # a progress event at least this often, changed or not (gaps stay under 1 s)


def base_url(request: Request) -> str:
    settings = services(request).settings
    return (settings.public_base_url or str(request.base_url)).rstrip("/")


def url_maker(request: Request):
    return lambda file_id: file_url(request, file_id)


async def submit(request: Request, raw_items: list, options: dict, label: str | None, webhook: str | None) -> Job:
    """Check every item (a 422 names the first bad one), store the job, hand it to the backend."""
    svc = services(request)
    if not raw_items:
        raise InvalidRequest("items is empty: send at least one item", field="items")
    if len(raw_items) > svc.settings.max_job_items:
        raise InvalidRequest(
            f"job of {len(raw_items)} items is over this server's limit of {svc.settings.max_job_items}; "
            "split it into several jobs",
            field="items",
        )
    await _admit(svc, len(raw_items))
    for i, raw in enumerate(raw_items):
        if not isinstance(raw, dict):
            raise InvalidRequest(f"items[{i}] must be an object with mode and text", field=f"items[{i}]")
    if webhook is not None:
        await check_webhook_url(webhook, svc.settings)
    new_items = await check_items(svc, raw_items, options, owner(request))
    job = await asyncio.to_thread(svc.jobs.create, new_items, owner=owner(request), label=label, webhook_url=webhook)
    try:
        await svc.job_backend.submitted(job.id)
    except QueueUnavailable:
        await asyncio.to_thread(svc.jobs.delete, job.id)  # no job the client does not know of
        raise
    return job


async def _admit(svc, items: int) -> None:
    """429 rather than an unbounded backlog: the items of all jobs still open, plus these, must fit
    QTTS_MAX_OPEN_JOB_ITEMS."""
    limit = svc.settings.max_open_job_items
    open_items = await asyncio.to_thread(svc.jobs.open_items)
    if open_items + items > limit:
        raise Overloaded(
            f"the job queue is full ({open_items} items queued or running, limit {limit}); submit again once "
            "earlier jobs have progressed",
            retry_after_s=30,
        )


async def load(request: Request, job_id: str) -> Job:
    return await asyncio.to_thread(services(request).jobs.get, job_id, owner=owner(request), check_owner=True)


@router.post("", status_code=202, response_model=JobView, response_model_exclude_none=True)
async def create_job(body: JobCreate, request: Request) -> JobView:
    """Queue a job; it runs as the engine has room. Watch it at `events_url` or poll GET."""
    job = await submit(request, body.items, body.options, body.label, body.webhook_url)
    return job_view(job, None, url_maker(request), base_url(request))


@router.get("", response_model=list[JobView], response_model_exclude_none=True)
async def list_jobs(request: Request, svc=Depends(services)) -> list[JobView]:
    """Your jobs, newest first (at most 100), without their items."""
    jobs = await asyncio.to_thread(svc.jobs.list, owner(request))
    return [job_view(job, None, url_maker(request), base_url(request)) for job in jobs]


@router.get("/{job_id}", response_model=JobView, response_model_exclude_none=True)
async def get_job(job_id: str, request: Request, svc=Depends(services)) -> JobView:
    """State, progress and every item (with its download URL once done)."""
    job = await load(request, job_id)
    items = await asyncio.to_thread(svc.jobs.items, job.id)
    return job_view(job, items, url_maker(request), base_url(request))


@router.delete("/{job_id}", response_model=JobView, response_model_exclude_none=True)
async def cancel_job(job_id: str, request: Request, tasks: BackgroundTasks, svc=Depends(services)) -> JobView:
    """Cancel: queued items never run, running ones are stopped in the engine; done ones are kept.
    The job's webhook, if any, then reports it cancelled."""
    job = await load(request, job_id)
    await asyncio.to_thread(svc.jobs.cancel, job.id)
    await svc.job_backend.cancelled(job.id)
    job, items = await asyncio.to_thread(_snapshot, svc, job_id)
    if job.over:
        tasks.add_task(send_webhook, svc.jobs, svc.settings, job.id)
    return job_view(job, items, url_maker(request), base_url(request))


@router.get(
    "/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "progress, item and end events"}},
)
async def job_events(job_id: str, request: Request, svc=Depends(services)) -> StreamingResponse:
    """Server-sent events: `progress` (at least every second while the job runs), `item` (each item as
    it ends), then `end` (the whole job) and the stream closes."""
    job = await load(request, job_id)
    return StreamingResponse(
        _events(request, job), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _events(request: Request, job: Job) -> AsyncIterator[bytes]:
    svc = services(request)
    job_id = job.id
    url_of, base = url_maker(request), base_url(request)
    reported: set[str] = set()
    last_progress: object = None
    loop = asyncio.get_running_loop()
    last_sent = 0.0
    while True:
        job = await asyncio.to_thread(svc.jobs.get, job_id)
        for item in await asyncio.to_thread(svc.jobs.finished_items, job_id, reported):
            reported.add(item.id)
            yield _sse("item", item_view(item, url_of).model_dump(exclude_none=True))
        view = job_view(job, None, url_of, base)
        progress = {"status": view.status, **view.progress.model_dump()}
        now = loop.time()
        if progress != last_progress or now - last_sent >= EVENT_HEARTBEAT_S:
            yield _sse("progress", progress)
            last_progress, last_sent = progress, now
        if job.over:
            items = await asyncio.to_thread(svc.jobs.items, job_id)
            yield _sse("end", job_view(job, items, url_of, base).model_dump(exclude_none=True))
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)


def _snapshot(svc, job_id: str) -> tuple[Job, list[Item]]:
    return svc.jobs.get(job_id), svc.jobs.items(job_id)


def _sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.get(
    "/{job_id}/archive",
    responses={200: {"content": {"application/zip": {}}, "description": "every output, and manifest.json"}},
)
async def job_archive(job_id: str, request: Request, svc=Depends(services)) -> FileResponse:
    """One zip of every output so far (`NNNNN-<custom_id>.<ext>`) and `manifest.json` (every item)."""
    job = await load(request, job_id)
    items = await asyncio.to_thread(svc.jobs.items, job.id)
    if not any(item.file_id for item in items):
        raise NotFound(f"job '{job.id}' has no output yet ({job.progress.done} items done); try again later")
    path = await asyncio.to_thread(_zip, svc, job, items)
    return FileResponse(
        path,
        media_type="application/zip",
        filename=f"{job.id}.zip",
        background=BackgroundTask(os.unlink, path),
    )


def _zip(svc, job: Job, items: list[Item]) -> str:
    """The job's outputs and a manifest as a zip in a temporary file (the response deletes it once sent; a
    failure here, a full disk included, leaves nothing behind)."""
    with disk_full_as_storage_full():
        fd, path = tempfile.mkstemp(prefix="qtts-job-", suffix=".zip")
        try:
            _write_zip(fd, svc, job, items)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
    return path


def _write_zip(fd: int, svc, job: Job, items: list[Item]) -> None:
    manifest: list[dict] = []
    with os.fdopen(fd, "wb") as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for item in items:
            entry = item_view(item, lambda _: None).model_dump(exclude_none=True)
            if item.file_id:
                try:
                    record = svc.files.get(item.file_id)
                    # A client's custom_id never becomes a path: no separators, no "..".
                    label = re.sub(r"[^\w-]", "_", item.custom_id or "item")[:80]
                    name = f"{item.idx:05d}-{label}{os.path.splitext(record.filename)[1]}"
                    archive.write(svc.files.path(item.file_id), arcname=name)
                    entry["archive_name"] = name
                except NotFound as exc:
                    entry["archive_error"] = exc.message
            manifest.append(entry)
        archive.writestr("manifest.json", json.dumps({"job_id": job.id, "items": manifest}, indent=1))
