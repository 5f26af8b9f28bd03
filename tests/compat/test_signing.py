"""The download URL signer on its own: what it signs, what it lets through, where its key comes from."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from qwen_tts_server.api.signing import UrlSigner, signing_key
from qwen_tts_server.errors import Forbidden
from tests.api.support import settings_for

FILE = "file-" + "ab" * 16
OTHER = "file-" + "cd" * 16
NOW = 1_800_000_000.0


def signer(key: bytes = b"k" * 32, now: float = NOW) -> UrlSigner:
    return UrlSigner(key, clock=lambda: now)


def signed(s: UrlSigner, file_id: str = FILE, expires_at: float = NOW + 60) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(s.query(file_id, expires_at)).items()}


def test_signature_is_hmac_sha256_over_id_and_expiry():
    key = b"secret"
    expected = hmac.new(key, f"{FILE}:1800000060".encode(), hashlib.sha256).hexdigest()
    assert UrlSigner(key).signature(FILE, 1800000060) == expected
    assert signer(key).query(FILE, 1800000060.9) == f"expires=1800000060&sig={expected}"


def test_a_valid_signature_lets_downloads_through():
    s = signer()
    query = signed(s)
    assert s.allows("GET", f"/api/v1/files/{FILE}/content", query) is True
    assert s.allows("GET", f"/api/v1/files/{FILE}", query) is True  # the old link shape
    assert s.allows("HEAD", f"/api/v1/files/{FILE}/content", query) is True
    assert s.allows("GET", f"/api/v1/files/{FILE}/content", query | {"sig": query["sig"].upper()}) is True


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", f"/api/v1/files/{FILE}"),
        ("POST", f"/api/v1/files/{FILE}/content"),
        ("GET", "/api/v1/files/upload"),
        ("GET", "/api/v1/models"),
        ("GET", f"/api/v1/files/{FILE}/content/x"),
        ("GET", f"/api/v1/voices/{FILE}"),
    ],
)
def test_a_signature_opens_nothing_but_downloads(method, path):
    s = signer()
    assert s.allows(method, path, signed(s)) is False  # the key check then answers as usual


def test_no_signature_is_not_a_signed_request():
    assert signer().allows("GET", f"/api/v1/files/{FILE}/content", {}) is False
    assert signer().allows("GET", f"/api/v1/files/{FILE}/content", {"expires": "1"}) is False


@pytest.mark.parametrize(
    "change",
    [
        {"sig": "0" * 64},
        {"sig": "not hex"},
        {"sig": ""},
        {"expires": str(int(NOW + 61))},
        {"expires": "-1"},
        {"expires": "1e12"},
        {"expires": "9" * 40},
    ],
)
def test_tampered_links_are_forbidden(change):
    s = signer()
    with pytest.raises(Forbidden):
        s.allows("GET", f"/api/v1/files/{FILE}/content", signed(s) | change)


def test_a_signature_is_for_one_file_and_one_key():
    s = signer()
    with pytest.raises(Forbidden):
        s.allows("GET", f"/api/v1/files/{OTHER}/content", signed(s, FILE))
    with pytest.raises(Forbidden):
        signer(b"another key").allows("GET", f"/api/v1/files/{FILE}/content", signed(s))


def test_expired_links_are_forbidden():
    query = signed(signer(), expires_at=NOW + 60)
    assert signer(now=NOW + 59).allows("GET", f"/api/v1/files/{FILE}/content", query)
    with pytest.raises(Forbidden, match="expired"):
        signer(now=NOW + 60).allows("GET", f"/api/v1/files/{FILE}/content", query)


def test_where_the_key_comes_from():
    def settings(**values):
        return settings_for(models_dir=Path("."), data_dir=Path("."), **values)

    key, source = signing_key(settings(url_signing_key="operator's key", api_keys="a,b"))
    assert (key, source) == (b"operator's key", "setting")
    derived, source = signing_key(settings(api_keys="a,b"))
    assert source == "api_keys" and derived not in (b"a", b"b") and len(derived) == 32
    assert signing_key(settings(api_keys="b,a"))[0] == derived  # every process with these keys agrees
    assert signing_key(settings(api_keys="a,c"))[0] != derived  # other keys: other links
    first, source = signing_key(settings())
    assert source == "random" and len(first) == 32 and signing_key(settings())[0] != first
    assert UrlSigner.for_settings(settings(api_keys="a")).source == "api_keys"
    with pytest.raises(ValueError):
        UrlSigner(b"")
