from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest

from qwen_tts_server.audio.sources import ReferenceAudio, ReferenceAudioResolver
from qwen_tts_server.config import Settings
from qwen_tts_server.errors import InvalidRequest, NotFound, PayloadTooLarge
from qwen_tts_server.net import is_blocked_address
from qwen_tts_server.storage.database import close_databases, sqlite_url
from qwen_tts_server.storage.files import FileRegistry

WavFn = Callable[..., bytes]
MAX_BYTES = 64 * 1024
FIELD = "ref_audio"


# --- fixtures ---


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[FileRegistry]:
    yield FileRegistry(tmp_path / "files", sqlite_url(tmp_path / "registry.sqlite3"), default_ttl_s=3600.0)
    close_databases()


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict = {
        "data_dir": tmp_path,
        "max_upload_bytes": MAX_BYTES,
        "min_ref_audio_s": 1.0,
        "max_ref_audio_s": 2.5,
        "ref_audio_url_timeout_s": 2.0,
    } | overrides
    return Settings(**values)


class NoNetwork(httpx.AsyncBaseTransport):
    """Stands in for the real transport where a test must prove nothing was sent."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raise AssertionError(f"connection attempted to {request.url}")


class FakeDns:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.table:
            raise OSError("no such host")
        return self.table[host]


def resolve(resolver: ReferenceAudioResolver, ref: str) -> ReferenceAudio:
    return asyncio.run(resolver.resolve(ref, field=FIELD))


@pytest.fixture(scope="module")
def audio_server(make_wav: WavFn) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving the URL cases; yields its base URL."""
    wav = make_wav(1.5, 16000)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {"Content-Length": str(len(body))}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/ok.wav":
                self._send(200, wav, {"Content-Type": "audio/wav", "Content-Length": str(len(wav))})
            elif self.path == "/big-declared":
                self._send(200, b"x" * (MAX_BYTES + 1))
            elif self.path == "/big-undeclared":  # no Content-Length: the body ends when the socket closes
                self.close_connection = True
                self._send(200, b"x" * (4 * MAX_BYTES), {"Content-Type": "audio/wav"})
            elif self.path == "/slow":
                time.sleep(3.0)
                self._send(200, wav)
            elif self.path == "/redirect":
                self._send(302, headers={"Location": "/ok.wav", "Content-Length": "0"})
            elif self.path == "/loop":
                self._send(302, headers={"Location": "/loop", "Content-Length": "0"})
            elif self.path == "/to-ftp":
                self._send(302, headers={"Location": "ftp://127.0.0.1/ok.wav", "Content-Length": "0"})
            else:
                self._send(404, b"not here")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- file ids ---


def test_file_id(tmp_path: Path, registry: FileRegistry, make_wav: WavFn) -> None:
    rec = registry.put(make_wav(1.5, 16000), kind="upload", filename="a.wav", media_type="audio/wav")
    ref = resolve(ReferenceAudioResolver(registry, make_settings(tmp_path)), rec.id)
    assert ref.cache_key == f"sha256:{rec.sha256}"  # by content: a file_id and base64 of its bytes share it
    assert ref.audio.sample_rate == 16000 and ref.audio.duration_s == pytest.approx(1.5)


@pytest.mark.parametrize("ref", ["file-" + "a" * 32, "file-abc"])
def test_unknown_file_id_is_not_found_with_field(tmp_path: Path, registry: FileRegistry, ref: str) -> None:
    with pytest.raises(NotFound, match="does not exist") as err:
        resolve(ReferenceAudioResolver(registry, make_settings(tmp_path)), ref)
    assert err.value.field == FIELD


# --- base64 ---


def test_base64_plain_and_data_uri(tmp_path: Path, registry: FileRegistry, make_wav: WavFn) -> None:
    wav = make_wav(1.5, 16000)
    encoded = base64.b64encode(wav).decode()
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path))
    expected_key = "sha256:" + hashlib.sha256(wav).hexdigest()
    for ref in (
        encoded,
        f"data:audio/wav;base64,{encoded}",
        "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76)),  # MIME line breaks
        base64.urlsafe_b64encode(wav).decode(),
    ):
        out = resolve(resolver, ref)
        assert out.cache_key == expected_key
        assert out.audio.duration_s == pytest.approx(1.5)


@pytest.mark.parametrize("ref", ["data:audio/wav;base64,@@not-base64@@", "A" * 65, "data:audio/wav;base64,QUJDR"])
def test_bad_base64(tmp_path: Path, registry: FileRegistry, ref: str) -> None:
    with pytest.raises(InvalidRequest, match="not valid base64") as err:
        resolve(ReferenceAudioResolver(registry, make_settings(tmp_path)), ref)
    assert err.value.field == FIELD


def test_data_uri_without_base64(tmp_path: Path, registry: FileRegistry) -> None:
    with pytest.raises(InvalidRequest, match="data URI must look like"):
        resolve(ReferenceAudioResolver(registry, make_settings(tmp_path)), "data:audio/wav,RIFF")


def test_base64_of_non_audio(tmp_path: Path, registry: FileRegistry) -> None:
    ref = base64.b64encode(b"this is plainly not audio " * 10).decode()
    with pytest.raises(InvalidRequest, match="not decodable audio"):
        resolve(ReferenceAudioResolver(registry, make_settings(tmp_path)), ref)


def test_base64_too_big(tmp_path: Path, registry: FileRegistry) -> None:
    ref = base64.b64encode(b"\0" * (MAX_BYTES + 10)).decode()
    with pytest.raises(PayloadTooLarge) as err:
        resolve(ReferenceAudioResolver(registry, make_settings(tmp_path)), ref)
    assert err.value.status_code == 413 and err.value.field == FIELD


def test_too_short_and_too_long(tmp_path: Path, registry: FileRegistry, make_wav: WavFn) -> None:
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path))
    with pytest.raises(InvalidRequest, match=r"too short \(0.30 s\); send at least 1.0 s"):
        resolve(resolver, base64.b64encode(make_wav(0.3, 8000)).decode())
    with pytest.raises(InvalidRequest, match="too long") as err:
        resolve(resolver, base64.b64encode(make_wav(3.0, 8000)).decode())
    assert err.value.field == FIELD


# --- paths ---


@pytest.fixture
def dirs(tmp_path: Path, make_wav: WavFn) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "sub" / "ok.wav").write_bytes(make_wav(1.5, 16000))
    (outside / "secret.wav").write_bytes(make_wav(1.5, 16000))
    (allowed / "escape.wav").symlink_to(outside / "secret.wav")
    (allowed / "inner.wav").symlink_to(allowed / "sub" / "ok.wav")
    return allowed, outside


def test_path_inside_allow_list(tmp_path: Path, registry: FileRegistry, dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path, allowed_audio_dirs=[allowed]))
    data = (allowed / "sub" / "ok.wav").read_bytes()
    for ref in (str(allowed / "sub" / "ok.wav"), "sub/ok.wav", str(allowed / "inner.wav")):
        out = resolve(resolver, ref)
        assert out.cache_key == "sha256:" + hashlib.sha256(data).hexdigest()
        assert out.audio.duration_s == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("make_ref", "message"),
    [
        (lambda a, o: str(o / "secret.wav"), "not inside an allowed directory"),
        (lambda a, o: str(a / "escape.wav"), "not inside an allowed directory"),
        (lambda a, o: "escape.wav", "not inside an allowed directory"),
        (lambda a, o: str(a / ".." / "outside" / "secret.wav"), "must not contain '..'"),
        (lambda a, o: "sub/../../outside/secret.wav", "must not contain '..'"),
        (lambda a, o: str(a / "missing.wav"), "does not exist"),
        (lambda a, o: str(a / "sub"), "does not exist or is not a file"),
    ],
)
def test_path_rejected(
    tmp_path: Path,
    registry: FileRegistry,
    dirs: tuple[Path, Path],
    make_ref: Callable[[Path, Path], str],
    message: str,
) -> None:
    allowed, outside = dirs
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path, allowed_audio_dirs=[allowed]))
    with pytest.raises(InvalidRequest, match=message) as err:
        resolve(resolver, make_ref(allowed, outside))
    assert err.value.field == FIELD


def test_paths_disabled(tmp_path: Path, registry: FileRegistry, dirs: tuple[Path, Path]) -> None:
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path))
    with pytest.raises(InvalidRequest, match="paths are disabled on this server; upload the file"):
        resolve(resolver, str(dirs[0] / "sub" / "ok.wav"))


def test_path_too_big(tmp_path: Path, registry: FileRegistry, dirs: tuple[Path, Path]) -> None:
    allowed, _ = dirs
    (allowed / "huge.wav").write_bytes(b"\0" * (MAX_BYTES + 1))
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path, allowed_audio_dirs=[allowed]))
    with pytest.raises(PayloadTooLarge):
        resolve(resolver, str(allowed / "huge.wav"))


# --- URLs against a real loopback server (allow_private_urls=True) ---


@pytest.fixture
def local_resolver(tmp_path: Path, registry: FileRegistry) -> ReferenceAudioResolver:
    settings = make_settings(tmp_path, allow_private_urls=True, ref_audio_url_timeout_s=1.0)
    return ReferenceAudioResolver(registry, settings)


def test_url_ok(local_resolver: ReferenceAudioResolver, audio_server: str) -> None:
    out = resolve(local_resolver, f"{audio_server}/ok.wav")
    assert out.cache_key.startswith("sha256:")
    assert out.audio.sample_rate == 16000 and out.audio.duration_s == pytest.approx(1.5)


def test_url_redirect_is_followed(local_resolver: ReferenceAudioResolver, audio_server: str) -> None:
    direct = resolve(local_resolver, f"{audio_server}/ok.wav")
    assert resolve(local_resolver, f"{audio_server}/redirect").cache_key == direct.cache_key


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/big-declared", PayloadTooLarge, "byte limit"),
        ("/big-undeclared", PayloadTooLarge, "byte limit"),
        ("/slow", InvalidRequest, "did not answer within 1 s"),
        ("/missing", InvalidRequest, "returned HTTP 404"),
        ("/loop", InvalidRequest, "redirected more than 3 times"),
        ("/to-ftp", InvalidRequest, "non-http"),
    ],
)
def test_url_failures(
    local_resolver: ReferenceAudioResolver, audio_server: str, path: str, error: type, message: str
) -> None:
    with pytest.raises(error, match=message) as err:
        resolve(local_resolver, f"{audio_server}{path}")
    assert err.value.field == FIELD


def test_url_connection_refused(local_resolver: ReferenceAudioResolver) -> None:
    with pytest.raises(InvalidRequest, match="could not be fetched"):
        resolve(local_resolver, "http://127.0.0.1:1/x.wav")


# --- SSRF: blocked before any connection (allow_private_urls=False) ---


@pytest.fixture
def guarded(tmp_path: Path, registry: FileRegistry) -> tuple[ReferenceAudioResolver, FakeDns, NoNetwork]:
    dns = FakeDns(
        {
            "localhost": ["127.0.0.1", "::1"],
            "intranet.example": ["192.168.1.5"],
            "mixed.example": ["93.184.216.34", "10.0.0.1"],
        }
    )
    net = NoNetwork()
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path), resolve_host=dns, transport=net)
    return resolver, dns, net


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.wav",
        "http://localhost:8080/x.wav",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x",
        "http://intranet.example/x.wav",
        "https://mixed.example/x.wav",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://[fd00::1]/x",
        "http://[fec0::1]/x",
        "http://0.0.0.0/x",
        "http://100.64.0.1/x",
        "http://224.0.0.1/x",
    ],
)
def test_private_urls_rejected_without_connecting(
    guarded: tuple[ReferenceAudioResolver, FakeDns, NoNetwork], url: str
) -> None:
    resolver, _, net = guarded
    with pytest.raises(InvalidRequest, match="non-public address") as err:
        resolve(resolver, url)
    assert err.value.field == FIELD
    assert net.requests == []


def test_literal_ip_skips_dns(guarded: tuple[ReferenceAudioResolver, FakeDns, NoNetwork]) -> None:
    resolver, dns, _ = guarded
    with pytest.raises(InvalidRequest):
        resolve(resolver, "http://10.0.0.1/x")
    assert dns.calls == []


def test_numeric_host_forms_resolved_and_rejected(tmp_path: Path, registry: FileRegistry) -> None:
    # No injected DNS: getaddrinfo parses these numerically (no lookup) and the result is checked.
    net = NoNetwork()
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path), transport=net)
    for url in ("http://2130706433/x", "http://127.1/x"):
        with pytest.raises(InvalidRequest, match="non-public address"):
            resolve(resolver, url)
    assert net.requests == []


def test_unresolvable_host(guarded: tuple[ReferenceAudioResolver, FakeDns, NoNetwork]) -> None:
    resolver, _, net = guarded
    with pytest.raises(InvalidRequest, match="could not be resolved"):
        resolve(resolver, "http://nowhere.example/x")
    assert net.requests == []


@pytest.mark.parametrize("url", ["ftp://example.com/a.wav", "file:///etc/passwd", "gopher://x:70/1"])
def test_non_http_schemes_rejected(guarded: tuple[ReferenceAudioResolver, FakeDns, NoNetwork], url: str) -> None:
    resolver, dns, net = guarded
    with pytest.raises(InvalidRequest, match="must be http or https"):
        resolve(resolver, url)
    assert dns.calls == [] and net.requests == []


# --- public hosts, through a mock transport (no traffic leaves the process) ---


class Recorder(httpx.AsyncBaseTransport):
    def __init__(self, respond: Callable[[httpx.Request], httpx.Response]) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)


def test_public_host_connection_is_pinned_to_checked_ip(
    tmp_path: Path, registry: FileRegistry, make_wav: WavFn
) -> None:
    wav = make_wav(1.5, 16000)
    net = Recorder(lambda req: httpx.Response(200, content=wav))
    dns = FakeDns({"audio.example": ["93.184.216.34"]})
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path), resolve_host=dns, transport=net)
    out = resolve(resolver, "https://audio.example:8443/v.wav?sig=1")
    assert out.cache_key == "sha256:" + hashlib.sha256(wav).hexdigest()
    (req,) = net.requests
    assert str(req.url) == "https://93.184.216.34:8443/v.wav?sig=1"
    assert req.headers["host"] == "audio.example:8443"
    assert req.extensions["sni_hostname"] == "audio.example"
    assert dns.calls == [("audio.example", 8443)]


@pytest.mark.parametrize("location", ["http://10.0.0.1/x", "http://intranet.example/x.wav", "//127.0.0.1/x"])
def test_redirect_hops_are_rechecked(tmp_path: Path, registry: FileRegistry, location: str) -> None:
    net = Recorder(lambda req: httpx.Response(302, headers={"Location": location}))
    dns = FakeDns({"audio.example": ["93.184.216.34"], "intranet.example": ["192.168.1.5"]})
    resolver = ReferenceAudioResolver(registry, make_settings(tmp_path), resolve_host=dns, transport=net)
    with pytest.raises(InvalidRequest, match="non-public address"):
        resolve(resolver, "http://audio.example/v.wav")
    assert len(net.requests) == 1


def test_is_blocked_address() -> None:
    blocked = [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.1",
        "127.0.0.2",
        "169.254.1.1",
        "0.0.0.0",
        "100.64.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "2002:c0a8:0101::1",
        "64:ff9b::a00:1",
        "2001:db8::1",
    ]
    public = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
    for text in blocked:
        assert is_blocked_address(ipaddress.ip_address(text)), text
    for text in public:
        assert not is_blocked_address(ipaddress.ip_address(text)), text


def test_empty_ref(tmp_path: Path, registry: FileRegistry) -> None:
    with pytest.raises(InvalidRequest, match="is empty"):
        resolve(ReferenceAudioResolver(registry, make_settings(tmp_path)), "  ")


def test_audio_is_float32_mono(tmp_path: Path, registry: FileRegistry, make_wav: WavFn) -> None:
    out = resolve(
        ReferenceAudioResolver(registry, make_settings(tmp_path)),
        base64.b64encode(make_wav(1.2, 8000, channels=2)).decode(),
    )
    assert out.audio.samples.dtype == np.float32 and out.audio.samples.ndim == 1
