"""Signed, expiring download URLs: what lets `<audio src=url>` and download links work when API keys
are on (a browser sends no key header with them).

A signed URL is `/api/v1/files/<id>/content?expires=<unix seconds>&sig=<hex>` where `sig` is
HMAC-SHA256 over `"<id>:<expires>"` with the server's signing key. The key check lets a GET (or HEAD)
of a file download (`/api/v1/files/<id>` or `/api/v1/files/<id>/content`) through without a key when
its signature is valid and not expired; any other route still needs a key.

The signing key: `QTTS_URL_SIGNING_KEY` when set (share it between replicas, or to keep links valid
when keys rotate); otherwise derived from the API keys (every process with the same keys signs
alike; changing the keys voids the links); without either, random per process (links die with it).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlencode

from ..config import Settings
from ..errors import Forbidden

DOWNLOAD_PATH = re.compile(r"/api/v1/files/(file-[0-9a-f]{32})(?:/content)?")
_SIG_RE = re.compile(r"[0-9a-f]{64}")
_DERIVE_LABEL = b"qwen-tts-server download URL signing v1"


def signing_key(settings: Settings) -> tuple[bytes, str]:
    """The key and where it came from: `setting`, `api_keys` or `random`."""
    if settings.url_signing_key:
        return settings.url_signing_key.encode(), "setting"
    if settings.api_keys:
        joined = "\n".join(sorted(settings.api_keys)).encode()
        return hmac.new(_DERIVE_LABEL, joined, hashlib.sha256).digest(), "api_keys"
    return secrets.token_bytes(32), "random"


class UrlSigner:
    def __init__(self, key: bytes, *, source: str = "setting", clock: Callable[[], float] = time.time) -> None:
        if not key:
            raise ValueError("the signing key is empty")
        self._key = key
        self.source = source
        self._clock = clock

    @classmethod
    def for_settings(cls, settings: Settings) -> UrlSigner:
        key, source = signing_key(settings)
        return cls(key, source=source)

    def signature(self, file_id: str, expires: int) -> str:
        return hmac.new(self._key, f"{file_id}:{expires}".encode(), hashlib.sha256).hexdigest()

    def query(self, file_id: str, expires_at: float) -> str:
        """`expires=...&sig=...` for a link to `file_id` that works until `expires_at` (unix seconds)."""
        expires = int(expires_at)
        return urlencode({"expires": expires, "sig": self.signature(file_id, expires)})

    def allows(self, method: str, path: str, query: Mapping[str, str]) -> bool:
        """Whether this request may skip the key check: True for a GET/HEAD of a file download with a
        valid, unexpired signature; False when it carries no signature or is no download (the key
        check then answers as usual); Forbidden when the signature is wrong or expired."""
        match = DOWNLOAD_PATH.fullmatch(path)
        if match is None or method not in ("GET", "HEAD") or "sig" not in query:
            return False
        file_id, sig, expires_text = match.group(1), query.get("sig", ""), query.get("expires", "")
        if not expires_text.isdigit() or len(expires_text) > 12:
            raise Forbidden("download link has no valid 'expires': use the url the API returned", field="expires")
        expires = int(expires_text)
        expected = self.signature(file_id, expires)
        if not (_SIG_RE.fullmatch(sig.lower()) and hmac.compare_digest(sig.lower(), expected)):
            raise Forbidden(
                "download link signature does not match: use the url the API returned, unchanged", field="sig"
            )
        if expires <= self._clock():
            raise Forbidden(
                "download link expired: fetch the file's metadata again (with a key) for a fresh url",
                field="expires",
            )
        return True
