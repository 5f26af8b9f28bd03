"""Route dependencies: the app's services, and download URLs as the client should see them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from .app import Services


def services(request: Request) -> Services:
    return request.app.state.services


def file_url(request: Request, file_id: str) -> str:
    base = request.app.state.services.settings.public_base_url or str(request.base_url)
    return f"{base.rstrip('/')}/api/v1/files/{file_id}/content"
