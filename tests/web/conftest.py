"""The web page in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, installed by
`make browser`; Playwright never downloads a browser of its own here) against a real server process on
the tiny checkpoints, with API keys on. Screenshots of every flow go to tests/web/artifacts/ (or
$QTTS_WEB_ARTIFACTS), named in the test summary."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path(os.environ.get("QTTS_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("QTTS_WEB_ARTIFACTS", Path(__file__).parent / "artifacts"))
API_KEY = "page-test-key"
# A fake microphone (a beep) that needs no permission prompt; autoplay without a gesture for replays.
CHROMIUM_ARGS = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--no-sandbox",  # root in CI
    "--disable-dev-shm-usage",
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")


@dataclass
class Server:
    url: str
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"x-api-key": API_KEY}, timeout=120)


@dataclass
class PageProblems:
    """What a page must never do: fail a script, break its CSP, or reach past its own server."""

    base: str
    errors: list[str] = field(default_factory=list)

    def watch(self, page) -> None:
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._console)
        page.on("request", self._request)
        page.on("response", self._response)

    def _console(self, message) -> None:
        text = message.text
        # API errors are the browser's "Failed to load resource" lines: the tests check them where they show
        if "Content Security Policy" in text or (message.type == "error" and "Failed to load resource" not in text):
            self.errors.append(f"console {message.type}: {text}")

    def _response(self, response) -> None:
        path = response.url.removeprefix(self.base)
        if (path == "/" or path.startswith("/web/")) and response.status >= 400:
            self.errors.append(f"the page's own file failed: {response.status} {response.url}")

    def _request(self, request) -> None:
        url = request.url
        if not (url.startswith(self.base) or url.startswith(("blob:", "data:"))):
            self.errors.append(f"request outside the server: {url}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: `make browser` installs Debian's chromium (as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="session")
def server(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[Server]:
    """`qwen-tts-server serve` in its own process, API keys on, on the tiny checkpoints."""
    port = _free_port()
    data = tmp_path_factory.mktemp("web-data")
    env = os.environ | {
        "QTTS_DOWNLOAD_SOURCE": "none",
        "QTTS_DEVICE": "cpu",
        "QTTS_DTYPE": "float32",
        "QTTS_API_KEYS": API_KEY,
        "QTTS_LOG_JSON": "false",
    }
    command = [sys.executable, "-m", "qwen_tts_server.cli", "serve", "--port", str(port)]
    command += ["--models-dir", str(tiny_models_dir), "--data-dir", str(data)]
    log_path = artifacts / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(process, url, log_path)
            yield Server(url=url, log=log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_up(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"the server exited at start:\n{log_path.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start within 120 s"
        time.sleep(0.3)


@pytest.fixture(scope="session")
def browser(chromium: Path):
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser, server: Server) -> Iterator[Callable[..., object]]:
    """Open the page in a fresh browser context (its own localStorage); `key=True` saves the API key
    first, as a user does once. Fails the test on a script error, a CSP violation or a request that
    leaves the server."""
    contexts = []
    problems = PageProblems(base=server.url)

    def open_(*, key: bool = True, **context_options):
        context_options.setdefault("viewport", {"width": 1280, "height": 900})
        context = browser.new_context(accept_downloads=True, **context_options)
        contexts.append(context)
        if key:
            context.add_init_script(f"localStorage.setItem('qtts.apiKey', {API_KEY!r})")
        page = context.new_page()
        page.set_default_timeout(60_000)
        problems.watch(page)
        page.goto(server.url + "/")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not problems.errors, "\n".join(problems.errors)


@pytest.fixture
def shot(artifacts: Path, request: pytest.FixtureRequest) -> Callable[..., Path]:
    """shot(page, "name"): a full-page screenshot into the artifacts folder."""

    def take(page, name: str) -> Path:
        path = artifacts / f"{request.node.name}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


def pytest_terminal_summary(terminalreporter) -> None:
    shots = sorted(ARTIFACTS.glob("*.png")) if ARTIFACTS.is_dir() else []
    if shots:
        terminalreporter.write_line(f"web page screenshots ({len(shots)}): {ARTIFACTS}")
