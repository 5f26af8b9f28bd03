"""API docs served from the package: `/docs` (Swagger UI) and `/redoc` work offline and with API keys.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so on a machine without internet they
are blank. Here the assets come from the `fastapi-offline` package (Swagger UI 5, which reads
OpenAPI 3.1, and ReDoc), served under `/docs/assets/`. With `QTTS_API_KEYS` set, the pages, their
assets and `/openapi.json` stay open (they hold no data, and a browser cannot send a key header to
open a page); the OpenAPI document then declares the bearer and `X-API-Key` schemes, so Swagger's
Authorize button takes the key and "Try it out" sends it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException

from ..config import Settings

log = logging.getLogger(__name__)

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/docs/assets"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
_CDN = {  # FastAPI's defaults, only when the package with the assets is missing
    "swagger-ui-bundle.js": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js",
    "swagger-ui.css": "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css",
    "redoc.standalone.js": "https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js",
    "favicon.png": "https://fastapi.tiangolo.com/img/favicon.png",
}
# Paths a browser must reach without a key: the pages, their assets and the document they render.
_OPEN = frozenset({DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL, "/openapi.json"})


def assets_dir() -> Path | None:
    """The folder with Swagger UI's and ReDoc's files (from `fastapi-offline`), or None."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if all((folder / name).is_file() for name in ASSETS) else None


def is_open_path(path: str) -> bool:
    """True for the docs pages, their assets and /openapi.json: no API key needed."""
    return path in _OPEN or path.startswith(ASSETS_URL + "/")


def install(app: FastAPI, settings: Settings, open_paths: frozenset[str] = frozenset()) -> None:
    """Add the docs routes (create the app with docs_url=None, redoc_url=None) and, with API keys on,
    the security schemes of the OpenAPI document. `open_paths`: routes that need no key."""
    folder = assets_dir()
    if folder is None:
        log.warning("fastapi-offline is not installed: /docs and /redoc load their scripts from a CDN")

    def asset(request: Request, name: str) -> str:
        if folder is None:
            return _CDN[name]
        return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=asset(request, "swagger-ui-bundle.js"),
            swagger_css_url=asset(request, "swagger-ui.css"),
            swagger_favicon_url=asset(request, "favicon.png"),
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API reference",
            redoc_js_url=asset(request, "redoc.standalone.js"),
            redoc_favicon_url=asset(request, "favicon.png"),
            with_google_fonts=False,
        )

    @app.get(ASSETS_URL + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if folder is None or name not in ASSETS:
            raise HTTPException(404, detail=f"no docs asset named {name!r}")
        return FileResponse(folder / name, media_type=ASSETS[name], headers={"cache-control": "public, max-age=86400"})

    if settings.api_keys:
        _declare_api_keys(app, open_paths)


def _declare_api_keys(app: FastAPI, open_paths: frozenset[str]) -> None:
    """Every operation needs a key (bearer or X-API-Key) but the open ones: Swagger shows Authorize."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the server's API keys (QTTS_API_KEYS), sent as Authorization: Bearer <key>",
            }
            schemes["apiKey"] = {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": "One of the server's API keys (QTTS_API_KEYS), sent as X-API-Key: <key>",
            }
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
            for path, operations in schema.get("paths", {}).items():
                if path in open_paths:
                    for operation in operations.values():
                        if isinstance(operation, dict):
                            operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
