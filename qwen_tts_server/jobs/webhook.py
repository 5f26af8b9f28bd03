"""A job's webhook: when its last item ends, the finished job (JSON, as GET /api/v1/jobs/{id} shows
it) is POSTed to the URL the client gave, once per job whichever process ends it (store.claim_webhook),
to a public address only (net.pinned_request), retried a few times on failure."""

from __future__ import annotations

import asyncio
import logging
import uuid

import httpx

from ..api.deps import download_url
from ..api.jobs.protocol import job_view
from ..api.signing import UrlSigner
from ..config import Settings
from ..net import pinned_request
from ..storage.database import through_outages
from .store import JobStore

log = logging.getLogger(__name__)

ATTEMPTS = 3
TIMEOUT_S = 10.0
BACKOFF_S = 1.0
FIELD = "webhook_url"


async def check_webhook_url(url: str, settings: Settings) -> None:
    """At submission: the URL is http(s) and its host a public address (InvalidRequest otherwise)."""
    async with httpx.AsyncClient(trust_env=False) as client:
        await pinned_request(client, "POST", url, field=FIELD, allow_private=settings.allow_private_urls)


async def send_webhook(store: JobStore, settings: Settings, job_id: str) -> bool:
    """POST the finished job to its webhook, if it has one and no one sent it yet. True if delivered."""
    claim = uuid.uuid4().hex[:8]
    url = await through_outages(store.claim_webhook, job_id, claim)  # a database outage delays it, never drops it
    if url is None:
        return False
    payload = await through_outages(webhook_payload, store, settings, job_id)
    ok = await _post(url, payload, settings)
    await through_outages(store.webhook_done, job_id, ok)
    return ok


def webhook_payload(store: JobStore, settings: Settings, job_id: str) -> dict:
    job, items = store.get(job_id), store.items(job_id)
    base = (settings.public_base_url or f"http://{settings.host}:{settings.port}").rstrip("/")
    signer = UrlSigner.for_settings(settings) if settings.api_keys else None
    view = job_view(job, items, lambda file_id: download_url(settings, base, signer, file_id), base)
    return {"event": "job.finished", "job": view.model_dump(mode="json", exclude_none=True)}


async def _post(url: str, payload: dict, settings: Settings) -> bool:
    async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                request = await pinned_request(
                    client, "POST", url, field=FIELD, allow_private=settings.allow_private_urls, json=payload
                )
                response = await client.send(request)
                if response.is_success:
                    log.info("webhook delivered", extra={"job_id": payload["job"]["id"]})
                    return True
                log.warning("webhook refused", extra={"status": response.status_code, "attempt": attempt})
            except Exception as exc:  # a failed delivery must never fail the job
                log.warning("webhook failed", extra={"error": type(exc).__name__, "attempt": attempt})
            await asyncio.sleep(BACKOFF_S * attempt)
    return False
