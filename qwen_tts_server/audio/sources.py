"""Turn a voice-clone `ref_audio` string into decoded audio.

`ref_audio` may be a registry file id, an http(s) URL, base64 audio (plain or a `data:` URI), or
a path inside an allow-listed directory. URLs are the dangerous case (SSRF): the host is resolved
and every address checked before any connection is opened, the connection is then pinned to a
checked address (so DNS cannot change its answer in between), and every redirect hop is checked
again the same way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import os
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from qwen_tts_server.audio.codec_io import DecodedAudio, check_duration, decode_audio
from qwen_tts_server.config import Settings
from qwen_tts_server.errors import InvalidRequest, NotFound, PayloadTooLarge
from qwen_tts_server.storage.files import FileRegistry, is_file_id

MAX_REDIRECTS = 3
MIN_BASE64_CHARS = 64
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_B64_STD_RE = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")
_B64_URLSAFE_RE = re.compile(r"[A-Za-z0-9\-_\s]+={0,2}\s*")
_WHITESPACE_RE = re.compile(r"\s+")
_FORMS = "a file_id, an http(s) URL, base64 audio, or a path inside an allowed directory"

ResolveHost = Callable[[str, int], list[str]]


class ReferenceAudio:
    """Reference audio, named by its content: `cache_key` is `sha256:<hex of the audio file's bytes>`
    however the bytes arrived (a file_id, base64, a URL, a path), so the voice-prompt cache finds a
    prompt by content. The bytes are decoded only when `decoded()` is awaited (the cache calls it on
    a miss): a cached reference is never decoded again. `source` says how it arrived."""

    def __init__(
        self,
        cache_key: str,
        *,
        audio: DecodedAudio | None = None,
        load: Callable[[], Awaitable[DecodedAudio]] | None = None,
        source: str = "upload",
    ) -> None:
        if audio is None and load is None:
            raise ValueError("ReferenceAudio needs the decoded audio or a way to decode it")
        self.cache_key = cache_key
        self.source = source  # file | url | upload (base64) | path
        self._audio = audio
        self._load = load

    @property
    def audio(self) -> DecodedAudio:
        if self._audio is None:
            raise RuntimeError("reference audio not decoded yet: await decoded() first")
        return self._audio

    async def decoded(self) -> DecodedAudio:
        """The decoded (and length-checked) audio; bad audio raises here, naming the request field."""
        if self._audio is None:
            assert self._load is not None
            self._audio = await self._load()
        return self._audio


def content_key(data: bytes) -> str:
    """The cache key of reference audio with these bytes (what `ReferenceAudio.cache_key` holds)."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_blocked_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for anything that is not a plain public unicast address, IPv4 embedded in IPv6 included."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is just a.b.c.d on a dual-stack socket
            return is_blocked_address(ip.ipv4_mapped)
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and is_blocked_address(embedded):
            return True
        if ip.is_site_local:
            return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None


class ReferenceAudioResolver:
    def __init__(
        self,
        files: FileRegistry,
        settings: Settings,
        *,
        resolve_host: ResolveHost | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`resolve_host` and `transport` exist for tests: fake DNS, and a transport that never connects."""
        self._files = files
        self._settings = settings
        self._resolve_host = resolve_host or _system_resolve
        self._transport = transport

    async def resolve(self, ref: str, *, field: str, decode: bool = True) -> ReferenceAudio:
        """The reference `ref` names, keyed by content. With `decode=False` the audio is decoded only
        when `decoded()` is awaited, and a file_id's bytes are not even read until then (its key is
        the SHA-256 the registry stored at upload)."""
        ref = ref.strip()
        if not ref:
            raise InvalidRequest(f"{field} is empty; send {_FORMS}", field=field)
        if is_file_id(ref) or (ref.startswith("file-") and not re.search(r"[./\\]", ref)):
            reference = await self._from_file_id(ref, field)
        else:
            scheme = _SCHEME_RE.match(ref)
            if scheme is not None:
                if scheme.group(1).lower() not in ("http", "https"):
                    raise InvalidRequest(
                        f"{field} URL must be http or https, not {scheme.group(1).lower()!r}", field=field
                    )
                data, source = await self._fetch_url(ref, field), "url"
            elif ref[:5].lower() == "data:":
                # Base64 references run to 27 M characters: checking and decoding them takes the
                # better part of a second, which must not stall the event loop (every other request).
                data, source = await asyncio.to_thread(self._from_data_uri, ref, field), "upload"
            elif await asyncio.to_thread(_looks_like_base64, ref):
                data, source = await asyncio.to_thread(self._from_base64, ref, field), "upload"
            else:
                data, source = await asyncio.to_thread(self._read_path, ref, field), "path"
            reference = self.from_bytes(
                data, field=field, source=source, key=await asyncio.to_thread(content_key, data)
            )
        if decode:
            await reference.decoded()
        return reference

    def from_bytes(self, data: bytes, *, field: str, source: str = "upload", key: str | None = None) -> ReferenceAudio:
        """Reference audio from bytes in hand (an upload), decoded and checked when first needed."""

        async def load() -> DecodedAudio:
            return await asyncio.to_thread(self._decode, data, field)

        return ReferenceAudio(key or content_key(data), load=load, source=source)

    # --- sources ---

    async def _from_file_id(self, file_id: str, field: str) -> ReferenceAudio:
        try:
            record = await asyncio.to_thread(self._files.get, file_id)
        except NotFound as exc:
            raise NotFound(exc.message, field=field) from None

        async def load() -> DecodedAudio:
            try:
                data = await asyncio.to_thread(self._files.read_bytes, file_id)
            except NotFound as exc:  # deleted or expired since
                raise NotFound(exc.message, field=field) from None
            return await asyncio.to_thread(self._decode, data, field)

        return ReferenceAudio(f"sha256:{record.sha256}", load=load, source="file")

    def _from_data_uri(self, ref: str, field: str) -> bytes:
        header, sep, payload = ref.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise InvalidRequest(f"{field} data URI must look like 'data:audio/wav;base64,<base64 data>'", field=field)
        return self._from_base64(payload, field)

    def _from_base64(self, text: str, field: str) -> bytes:
        # The same as _WHITESPACE_RE.sub("", text) (str.split splits at exactly the characters `\s`
        # matches), 20x faster: the regex held the GIL, so every thread and the event loop, for ~0.4 s.
        compact = "".join(text.split())
        limit = self._settings.max_upload_bytes
        if len(compact) // 4 * 3 > limit + 3:
            raise PayloadTooLarge(self._too_large(field), field=field)
        altchars = b"-_" if ("-" in compact or "_" in compact) else None
        if len(compact) % 4 in (2, 3) and not compact.endswith("="):
            compact += "=" * (-len(compact) % 4)  # unpadded base64 is common; a remainder of 1 never is
        try:
            data = base64.b64decode(compact, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest(
                f"{field} is not valid base64 (bad characters or padding); "
                f"send standard base64 of the audio file's bytes, optionally as a data: URI",
                field=field,
            ) from None
        if len(data) > limit:
            raise PayloadTooLarge(self._too_large(field), field=field)
        return data

    def _read_path(self, ref: str, field: str) -> bytes:
        allowed = self._settings.allowed_audio_dirs
        if not allowed:
            raise InvalidRequest(
                f"{field} looks like a file path, but paths are disabled on this server; upload the "
                f"file (POST /api/v1/files/upload) and send its file_id, or send base64 audio or an http(s) URL",
                field=field,
            )
        if "\x00" in ref:
            raise InvalidRequest(f"{field} path contains a NUL byte", field=field)
        path = Path(ref)
        if ".." in path.parts:
            raise InvalidRequest(f"{field} path must not contain '..'", field=field)
        roots = [Path(os.path.realpath(d)) for d in allowed]
        # Relative paths are taken relative to the allowed directories, first match wins.
        candidates = [path] if path.is_absolute() else [root / path for root in roots]
        escaped = False
        for candidate in candidates:
            real = Path(os.path.realpath(candidate))  # follows every symlink
            if not any(real == root or real.is_relative_to(root) for root in roots):
                escaped = True
                continue
            if not real.is_file():
                continue
            try:
                if real.stat().st_size > self._settings.max_upload_bytes:
                    raise PayloadTooLarge(self._too_large(field), field=field)
                return real.read_bytes()  # the checked real path, not the one given
            except OSError as exc:
                raise InvalidRequest(
                    f"{field} path could not be read ({exc.strerror or type(exc).__name__})", field=field
                ) from None
        if escaped:
            raise InvalidRequest(f"{field} path is not inside an allowed directory; send {_FORMS}", field=field)
        raise InvalidRequest(f"{field} path {ref!r} does not exist or is not a file", field=field)

    # --- URLs ---

    async def _fetch_url(self, url: str, field: str) -> bytes:
        timeout_s = self._settings.ref_audio_url_timeout_s
        try:
            return await asyncio.wait_for(self._fetch_following(url, field), timeout=timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            raise InvalidRequest(f"{field} URL did not answer within {timeout_s:g} s", field=field) from None
        except httpx.HTTPError as exc:
            raise InvalidRequest(
                f"{field} URL could not be fetched ({type(exc).__name__}); check that it is reachable",
                field=field,
            ) from None

    async def _fetch_following(self, url: str, field: str) -> bytes:
        timeout = httpx.Timeout(self._settings.ref_audio_url_timeout_s)
        # trust_env=False: an environment proxy would connect on our behalf and defeat the IP pinning.
        async with httpx.AsyncClient(
            transport=self._transport, timeout=timeout, follow_redirects=False, trust_env=False
        ) as client:
            for _hop in range(MAX_REDIRECTS + 1):
                request = await self._pinned_request(client, url, field)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = urllib.parse.urljoin(url, response.headers["location"])
                        match = _SCHEME_RE.match(url)
                        if match is None or match.group(1).lower() not in ("http", "https"):
                            raise InvalidRequest(f"{field} URL redirected to a non-http(s) URL", field=field)
                        continue
                    if not response.is_success:
                        raise InvalidRequest(
                            f"{field} URL returned HTTP {response.status_code}; send a URL that serves "
                            f"the audio file directly",
                            field=field,
                        )
                    return await self._read_body(response, field)
                finally:
                    await response.aclose()
        raise InvalidRequest(f"{field} URL redirected more than {MAX_REDIRECTS} times", field=field)

    async def _pinned_request(self, client: httpx.AsyncClient, url: str, field: str) -> httpx.Request:
        """Check the URL's host and build a request that connects to one checked address."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise InvalidRequest(f"{field} is not a valid URL", field=field) from None
        host = parsed.raw_host.decode("ascii")  # IDNA-encoded; IPv6 without brackets
        if not host:
            raise InvalidRequest(f"{field} URL has no host", field=field)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        literal = _parse_ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                resolved = await asyncio.to_thread(self._resolve_host, host, port)
            except (OSError, UnicodeError):
                resolved = []
            addresses = [ip for ip in map(_parse_ip, resolved) if ip is not None]
            if not addresses:
                raise InvalidRequest(f"{field} URL host {host!r} could not be resolved", field=field)
        if not self._settings.allow_private_urls and any(is_blocked_address(ip) for ip in addresses):
            raise InvalidRequest(
                f"{field} URL points to a private, loopback or otherwise non-public address; "
                f"use a public URL or upload the file",
                field=field,
            )
        target = addresses[0]
        host_header = f"[{host}]" if ":" in host else host
        if parsed.port is not None:
            host_header += f":{parsed.port}"
        pinned = parsed.copy_with(host=str(target))
        extensions = {"sni_hostname": host} if parsed.scheme == "https" and literal is None else {}
        return client.build_request(
            "GET",
            pinned,
            headers={
                "Host": host_header,
                "Accept": "audio/*, */*;q=0.5",
                "Accept-Encoding": "identity",  # the byte limit then bounds what we hold in memory
            },
            extensions=extensions,
        )

    async def _read_body(self, response: httpx.Response, field: str) -> bytes:
        limit = self._settings.max_upload_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(self._too_large(field), field=field)
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(self._too_large(field), field=field)
            chunks.append(chunk)
        return b"".join(chunks)

    # --- helpers ---

    def _decode(self, data: bytes, field: str) -> DecodedAudio:
        s = self._settings
        audio = decode_audio(data, field=field, max_duration_s=s.max_ref_audio_s)
        check_duration(audio, min_s=s.min_ref_audio_s, max_s=s.max_ref_audio_s, field=field)
        return audio

    def _too_large(self, field: str) -> str:
        return f"{field} is larger than the {self._settings.max_upload_bytes} byte limit; send a shorter clip"


def _looks_like_base64(ref: str) -> bool:
    """Long, and only one base64 alphabet; paths almost always have a '.', '_' and '/' mix, or are short."""
    if len(ref) < MIN_BASE64_CHARS:
        return False
    return _B64_STD_RE.fullmatch(ref) is not None or _B64_URLSAFE_RE.fullmatch(ref) is not None
