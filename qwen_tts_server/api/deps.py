"""Route dependencies: the app's services, and download URLs as the client should see them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi import Request

from ..config import Settings
from .signing import UrlSigner

if TYPE_CHECKING:
    from .services import Services


def services(request: Request) -> Services:
    return request.app.state.services


def file_url(request: Request, file_id: str, *, expires_at: float | None = None) -> str:
    """The download URL of a file, on the base the client used (or QTTS_PUBLIC_BASE_URL)."""
    settings = request.app.state.services.settings
    base = settings.public_base_url or str(request.base_url)
    signer = getattr(request.app.state, "url_signer", None)
    return download_url(settings, base, signer, file_id, expires_at=expires_at)


def download_url(
    settings: Settings, base: str, signer: UrlSigner | None, file_id: str, *, expires_at: float | None = None
) -> str:
    """A file's download URL under `base`. With API keys on it is signed (api/signing.py): it works
    without a key header (for `<audio src>` and links) until `expires_at`, the file's own expiry
    (default: a file's lifetime from now). Also for URLs made without a request (job webhooks)."""
    url = f"{base.rstrip('/')}/api/v1/files/{file_id}/content"
    if settings.api_keys and signer is not None:
        url += "?" + signer.query(file_id, expires_at if expires_at is not None else time.time() + settings.file_ttl_s)
    return url


def owner(request: Request) -> str | None:
    """Who owns what this request creates: the SHA-256 of its API key (set by the key check), or
    None when the server runs without keys."""
    return getattr(request.state, "owner", None)
