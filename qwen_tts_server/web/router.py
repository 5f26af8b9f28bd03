"""The web page: `/` is the page, `/web/...` its scripts and styles, all from this package's `static`
folder (nothing from a CDN: it works on a machine without internet).

The page and its assets are public, as `/docs` is (they hold no data, and a browser cannot send a key
to open a page); the page's API calls carry the key the user typed. A Content-Security-Policy keeps it
to its own origin: no script, style or request can go anywhere else.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
PAGE_URL = "/"
ASSETS_URL = "/web"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob: data:; connect-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidated (ETag) on each load: a new version shows at once
}


def is_open_path(path: str) -> bool:
    """The page and its assets need no API key."""
    return path == PAGE_URL or path.startswith(ASSETS_URL + "/")


class _Assets(StaticFiles):
    """StaticFiles with the page's headers (a 304 keeps them too)."""

    async def get_response(self, path: str, scope: Scope):  # type: ignore[override]
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def install(app: FastAPI) -> None:
    """Serve the page at `/` and its assets under `/web/`."""

    @app.get(PAGE_URL, include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)

    app.mount(ASSETS_URL, _Assets(directory=STATIC_DIR), name="web")
