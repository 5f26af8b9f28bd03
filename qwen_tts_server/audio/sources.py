"""Turn a voice-clone `ref_audio` string into decoded audio.

`ref_audio` may be a registry file id, an http(s) URL, base64 audio (plain or a `data:` URI), or
a path inside an allow-listed directory. URLs are the dangerous case (SSRF): the host is resolved
and every address checked before any connection is opened, the connection is then pinned to a
checked address (so DNS cannot change its answer in between), and every redirect hop is checked
again the same way.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import os
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx

from qwen_tts_server.audio.codec_io import DecodedAudio, check_duration, decode_audio
from qwen_tts_server.config import Settings
from qwen_tts_server.errors import InvalidRequest, NotFound, PayloadTooLarge
from qwen_tts_server.net import ResolveHost, pinned_request, system_resolve
from qwen_tts_server.storage.files import FileRegistry, is_file_id
from qwen_tts_server.text.checks import checked_text, checked_text_in_slices, pause_for_other_threads

MAX_REDIRECTS = 3
MIN_BASE64_CHARS = 64
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# Base64 references run to 27 M characters. One C call over all of them (a regex, str.split, base64
# decoding) holds the GIL for 30-120 ms, and so stalls the event loop even when it runs in a worker
# thread; a slice of 256 K characters is under a millisecond of any step, after which the loop may run.
SLICE = 1 << 18
_B64_COMMON = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_B64_STD_PART_RE = re.compile(r"[A-Za-z0-9+/\s]*")
_B64_URLSAFE_PART_RE = re.compile(r"[A-Za-z0-9\-_\s]*")
_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.split() splits at, below 128
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")
_FORMS = "a file_id, an http(s) URL, base64 audio, or a path inside an allowed directory"


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
        self._resolve_host = resolve_host or system_resolve
        self._transport = transport

    async def resolve(self, ref: str, *, field: str, decode: bool = True) -> ReferenceAudio:
        """The reference `ref` names, keyed by content. With `decode=False` the audio is decoded only
        when `decoded()` is awaited, and a file_id's bytes are not even read until then (its key is
        the SHA-256 the registry stored at upload)."""
        ref = ref.strip()
        if not ref:
            raise InvalidRequest(f"{field} is empty; send {_FORMS}", field=field)
        if len(ref) > SLICE:  # request models leave long references unchecked (validation.ReferenceText)
            await asyncio.to_thread(checked_text_in_slices, field, ref)
        else:
            checked_text(field, ref)
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
            else:
                # Base64 references run to 27 M characters: checking and decoding them takes the better
                # part of a second, which must not stall the event loop (every other request).
                data, source = await asyncio.to_thread(self._from_inline_or_path, ref, field)
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

    def _from_inline_or_path(self, ref: str, field: str) -> tuple[bytes, str]:
        """The bytes of a data: URI, base64 or an allowed path, and which it was. Run in a worker thread."""
        if ref[:5].lower() == "data:":
            return self._from_data_uri(ref, field), "upload"
        if _looks_like_base64(ref):
            return self._from_base64(ref, field), "upload"
        return self._read_path(ref, field), "path"

    def _from_data_uri(self, ref: str, field: str) -> bytes:
        comma = ref.find(",")
        if comma < 0 or not ref[:comma].lower().endswith(";base64"):
            raise InvalidRequest(f"{field} data URI must look like 'data:audio/wav;base64,<base64 data>'", field=field)
        return self._from_base64(ref, field, start=comma + 1)  # no copy of the payload

    def _from_base64(self, text: str, field: str, *, start: int = 0) -> bytes:
        """`base64.b64decode` of `text[start:]` without whitespace, strictly (`validate=True`), with the
        URL-safe alphabet when `-` or `_` occurs and unpadded input padded; a slice at a time, so no
        step holds the GIL for more than about a millisecond (decoding all 27 M characters in one call
        held it for ~120 ms, and stripping whitespace with str.split for ~30 ms)."""
        try:
            compact = [piece for piece in map(_ascii_without_whitespace, _slices(text, start)) if piece]
        except UnicodeEncodeError:  # b64decode's ValueError for a str with other characters
            raise InvalidRequest(self._not_base64(field), field=field) from None
        size = sum(map(len, compact))
        limit = self._settings.max_upload_bytes
        if size // 4 * 3 > limit + 3:
            raise PayloadTooLarge(self._too_large(field), field=field)
        urlsafe = any(b"-" in piece or b"_" in piece for piece in compact)
        if size % 4 in (2, 3) and not compact[-1].endswith(b"="):
            compact[-1] += b"=" * (-size % 4)  # unpadded base64 is common; a remainder of 1 never is
        try:
            data = _decode_quads(compact, urlsafe)
        except binascii.Error:
            raise InvalidRequest(self._not_base64(field), field=field) from None
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
        """Check the URL's host and build a GET that connects to one checked address (net.py)."""
        return await pinned_request(
            client,
            "GET",
            url,
            field=field,
            allow_private=self._settings.allow_private_urls,
            resolve=self._resolve_host,
            headers={
                "Accept": "audio/*, */*;q=0.5",
                "Accept-Encoding": "identity",  # the byte limit then bounds what we hold in memory
            },
            advice="use a public URL or upload the file",
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

    @staticmethod
    def _not_base64(field: str) -> str:
        return (
            f"{field} is not valid base64 (bad characters or padding); "
            f"send standard base64 of the audio file's bytes, optionally as a data: URI"
        )


def _looks_like_base64(ref: str) -> bool:
    """Long, and only one base64 alphabet; paths almost always have a '.', '_' and '/' mix, or are short.

    The same test as `[A-Za-z0-9+/\\s]+={0,2}\\s*` or its URL-safe twin matching all of `ref`, a slice
    at a time: one regex over 27 M characters held the GIL for ~90 ms."""
    if len(ref) < MIN_BASE64_CHARS:
        return False
    end = len(ref)
    while end and ref[end - 1].isspace():
        end -= 1
    for _ in range(2):
        if end and ref[end - 1] == "=":
            end -= 1
    if end == 0:  # nothing before the padding: a match only if it was all whitespace
        return ref.isspace()
    std = urlsafe = True
    for part in _slices(ref, 0, end):
        part_std, part_urlsafe = _alphabets(part)
        std, urlsafe = std and part_std, urlsafe and part_urlsafe
        if not (std or urlsafe):
            return False
    return True


def _slices(text: str, start: int = 0, end: int | None = None) -> Iterator[str]:
    """`text[start:end]` in slices of SLICE characters (each a copy of at most 256 K characters);
    between two, other threads get the GIL."""
    end = len(text) if end is None else end
    for at in range(start, end, SLICE):
        if at > start:
            pause_for_other_threads()
        yield text[at : min(at + SLICE, end)]


def _alphabets(part: str) -> tuple[bool, bool]:
    """Whether `part` is only whitespace and standard base64 characters, and whether only whitespace
    and URL-safe ones ('=' is in neither)."""
    if not part.isascii():  # rare: Unicode whitespace in base64; re takes it
        return _B64_STD_PART_RE.fullmatch(part) is not None, _B64_URLSAFE_PART_RE.fullmatch(part) is not None
    rest = part.encode("ascii").translate(None, _B64_COMMON)  # what is not a letter or a digit
    return _only_whitespace(rest.translate(None, b"+/")), _only_whitespace(rest.translate(None, b"-_"))


def _only_whitespace(ascii_bytes: bytes) -> bool:
    return ascii_bytes.decode("ascii").isspace() or not ascii_bytes  # str's whitespace, as `\\s` and split()


def _ascii_without_whitespace(part: str) -> bytes:
    """`"".join(part.split())` as ASCII bytes; UnicodeEncodeError when anything else is left."""
    if part.isascii():
        return part.encode("ascii").translate(None, _ASCII_WHITESPACE)
    return "".join(part.split()).encode("ascii")


def _decode_quads(pieces: list[bytes], urlsafe: bool) -> bytes:
    """`binascii.a2b_base64(b"".join(pieces), strict_mode=True)` (with `-_` read as `+/` when
    `urlsafe`), decoded in runs of whole 4-character quads up to the first `=`; from there on, what
    is left (the padding, in valid input a few characters) in one call, as the whole would be."""
    out: list[bytes] = []
    carry = b""  # a partial quad: every run before it was whole quads
    for i, piece in enumerate(pieces):
        if i:
            pause_for_other_threads()
        if b"=" in piece or i == len(pieces) - 1:
            _decode_tail(carry + b"".join(pieces[i:]), urlsafe, out)
            break
        run = carry + piece
        whole = len(run) - len(run) % 4
        run, carry = run[:whole], run[whole:]
        out.append(binascii.a2b_base64(run.translate(_URLSAFE_TO_STD) if urlsafe else run, strict_mode=True))
    return b"".join(out)


def _decode_tail(tail: bytes, urlsafe: bool, out: list[bytes]) -> None:
    """Decode `tail`, which starts on a quad boundary after the runs in `out`, as the whole input's
    decoding would go on. Strict decoding refuses `=` first in its input ("leading padding"), but
    after whole quads it skips a `=` and refuses any data after one: the only difference."""
    if urlsafe:
        tail = tail.translate(_URLSAFE_TO_STD)
    pad = tail.find(b"=")
    if pad < 0:
        out.append(binascii.a2b_base64(tail, strict_mode=True))
        return
    quads = pad - pad % 4
    if quads:
        out.append(binascii.a2b_base64(tail[:quads], strict_mode=True))
    rest = tail[quads:]
    if rest[:1] == b"=" and out:  # padding right after whole quads, not at the very start
        if rest.strip(b"="):
            raise binascii.Error("Discontinuous padding not allowed")
        return
    out.append(binascii.a2b_base64(rest, strict_mode=True))
