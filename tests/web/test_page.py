"""Every flow of the web page clicked through in Chromium, against a real server on the tiny checkpoints.

The audio is noise (random weights); what is checked is what the page does with it: streaming playback
that starts before the request ends (timestamps the page records), downloads in every format, the voice
library, a recording from Chromium's fake microphone, a batch job followed to its end, API errors shown
in the API's words, keyboard use, contrast and a phone's width.
"""

from __future__ import annotations

import io
import re
import wave
import zipfile
from importlib import resources
from pathlib import Path

import httpx
import pytest

from tests.api.support import sine_wav, words

from .conftest import API_KEY, Server, sync_api

expect = sync_api.expect
pytestmark = pytest.mark.slow

DONE = 180_000  # ms: a request on the tiny models on a busy 2-core CPU
MAGIC = {
    "wav": (b"RIFF",),
    "mp3": (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"),
    "flac": (b"fLaC",),
    "opus": (b"OggS",),
    "aac": (b"\xff\xf1", b"\xff\xf9"),
}


# ----- helpers -----
def speak(page) -> dict[str, str]:
    """Click Speak and wait for this request's result; returns the result element's data attributes."""
    run = int(page.get_attribute("#result", "data-run") or 0) + 1
    page.click("#speak-button")
    finished = f'#result[data-run="{run}"]:is([data-state="done"], [data-state="error"], [data-state="stopped"])'
    page.locator(finished).wait_for(timeout=DONE)
    dataset = result_data(page)
    assert dataset["state"] == "done", page.inner_text("#speak-error")
    return dataset


def result_data(page) -> dict[str, str]:
    return page.evaluate("() => ({...document.querySelector('#result').dataset})")


def choose_mode(page, mode: str) -> None:
    page.check(f'input[name="mode"][value="{mode}"]')


def open_tab(page, name: str) -> None:
    page.click(f"#tab-{name}")
    expect(page.locator(f"#panel-{name}")).to_be_visible()


def record(page, recorder: str, seconds: float = 1.6) -> float:
    """Record from Chromium's fake microphone; returns the recorded length the page reports."""
    root = page.locator(recorder)
    root.get_by_role("button", name="Record").click()
    expect(root).to_have_attribute("data-recording", "true")
    page.wait_for_timeout(int(seconds * 1000))
    root.get_by_role("button", name="Stop recording").click()
    expect(root.locator("audio")).to_be_visible()
    return float(root.get_attribute("data-recorded"))


def api_error(response: httpx.Response) -> str:
    assert response.status_code >= 400, response.text
    return response.json()["error"]["message"]


def saved(download) -> bytes:
    return Path(download.path()).read_bytes()


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as wav:
        return wav.getnframes() / wav.getframerate()


def jobs_api(server: Server) -> bool:
    paths = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    return "/api/v1/jobs" in paths and "/api/v1/jobs/{job_id}/events" in paths


# ----- the page itself -----
def test_page_is_public_self_contained_and_the_api_still_needs_a_key(server: Server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = httpx.get(server.url + "/web/js/main.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(server.url + "/api/v1/speakers", timeout=10).status_code == 401
    assert httpx.get(server.url + "/web/nothing.js", timeout=10).status_code == 404

    static = resources.files("qwen_tts_server.web") / "static"
    names = [path.name for path in static.joinpath("js").iterdir()]
    assert {"main.js", "player.js", "stream.js", "batch.js", "recorder.js"} <= set(names)
    for path in [static / "index.html", static / "style.css", *static.joinpath("js").iterdir()]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), f"{path.name} loads something from afar"
        assert not re.search(r"""import[^;]*from\s+["']https?:""", text), f"{path.name} imports from afar"


def test_keyboard_labels_and_contrast(open_page, shot):
    page = open_page()
    expect(page.locator("#speaker option")).not_to_have_count(0)
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter((el) => el.type !== 'hidden')
            .filter((el) => !(el.labels?.length || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
                              || (el.tagName === 'BUTTON' && el.textContent.trim())))
            .map((el) => el.outerHTML.slice(0, 80))"""
    )
    assert unlabeled == []

    # tabs: arrow keys, Home and End move the selection and the focus
    page.focus("#tab-speak")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-voices")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#tab-voices")).to_be_focused()
    expect(page.locator("#panel-voices")).to_be_visible()
    expect(page.locator("#panel-speak")).to_be_hidden()
    page.keyboard.press("End")
    expect(page.locator("#tab-history")).to_be_focused()
    page.keyboard.press("Home")
    expect(page.locator("#panel-speak")).to_be_visible()
    # the form is reachable by keyboard: Tab from the tabs lands on its first control
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.name") == "mode"
    # options are folded away until asked for
    expect(page.locator("#temperature")).to_be_hidden()
    page.click("details.options summary")
    expect(page.locator("#temperature")).to_be_visible()

    assert_contrast(page)
    shot(page, "light")
    dark = open_page(color_scheme="dark")
    expect(dark.locator("#speaker option")).not_to_have_count(0)
    assert_contrast(dark)
    shot(dark, "dark")


CONTRAST_JS = """(selectors) => {
  const rgb = (text) => text.match(/[\\d.]+/g).slice(0, 4).map(Number);
  const luminance = ([r, g, b]) => {
    const c = [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  };
  const background = (el) => {
    for (let node = el; node; node = node.parentElement) {
      const color = rgb(getComputedStyle(node).backgroundColor);
      if (color.length < 4 || color[3] > 0.5) return color;
    }
    return [255, 255, 255];
  };
  return selectors.map((selector) => {
    const el = document.querySelector(selector);
    const fg = luminance(rgb(getComputedStyle(el).color));
    const bg = luminance(background(el));
    return [selector, (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05)];
  });
}"""


def assert_contrast(page) -> None:
    selectors = ["h1", "label[for=text]", ".hint", "#tab-speak", "#tab-voices", "#speak-button", "#play-button"]
    selectors += [".server-status", "#key-state", "details.options summary"]
    for selector, ratio in page.evaluate(CONTRAST_JS, selectors):
        assert ratio >= 4.5, f"{selector}: contrast {ratio:.2f} < 4.5"


def test_phone_layout(open_page, shot):
    page = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=2)
    expect(page.locator("#speaker option")).not_to_have_count(0)
    for tab in ("speak", "voices", "batch", "history"):
        open_tab(page, tab)
        width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"{tab}: the page is wider than the phone ({width})"
        shot(page, f"phone-{tab}")
    open_tab(page, "speak")
    for control in ("#speak-button", "#text", "#speaker", "#tab-batch"):
        box = page.locator(control).bounding_box()
        assert box["height"] >= 44 and box["width"] <= 390, f"{control}: {box}"
    form, result = page.locator("#speak-form").bounding_box(), page.locator("#result").bounding_box()
    assert result["y"] >= form["y"] + form["height"], "on a phone the result comes below the form"


# ----- API key and errors -----
def test_api_key_once_and_api_errors_in_the_apis_words(server: Server, open_page, shot):
    page = open_page(key=False)
    missing_key = api_error(httpx.get(server.url + "/api/v1/speakers", timeout=10))
    error = page.locator("#speak-error")
    expect(error).to_contain_text(missing_key)
    expect(error).to_contain_text("401")
    expect(page.locator("#key-panel")).to_have_attribute("open", "")
    expect(page.locator("#api-key")).to_be_focused()
    shot(page, "key-needed")

    page.fill("#api-key", "not-the-key")
    page.click("#key-form button[type=submit]")
    expect(error).to_contain_text(missing_key)

    if page.get_attribute("#key-panel", "open") is None:  # the 401 opened it again
        page.click("#key-state")
    page.fill("#api-key", API_KEY)
    page.click("#key-form button[type=submit]")
    expect(error).to_be_hidden()
    with server.client() as client:
        catalog = client.get("/api/v1/speakers").json()
    default = catalog["defaults"]["custom_voice"]
    speakers = next(model["speakers"] for model in catalog["models"] if model["name"] == default)
    expect(page.locator("#speaker option")).to_have_count(len(speakers))
    assert page.eval_on_selector_all("#speaker option", "els => els.map((el) => el.value)") == speakers
    expect(page.locator("#key-state")).to_have_text("API key: set")

    # the key stays in this browser: a reload needs no typing
    page.reload()
    expect(page.locator("#speaker option")).to_have_count(len(speakers))

    # a request the API refuses: the message is the API's own, the field is marked
    with server.client() as client:
        empty_text = api_error(client.post("/api/v1/custom-voice", json={"text": "", "speaker": speakers[0]}))
    page.click("#speak-button")
    expect(error).to_contain_text(empty_text)
    expect(error).to_contain_text("422")
    expect(page.locator("#text")).to_have_attribute("aria-invalid", "true")
    assert page.get_attribute("#result", "data-state") == "error"
    shot(page, "api-error")


# ----- speak -----
def test_custom_voice_plays_while_it_is_generated(server: Server, open_page, shot):
    page = open_page()
    expect(page.locator("#speaker option")).not_to_have_count(0)
    text = words(70)
    page.fill("#text", text)
    page.select_option("#speaker", "ryan")
    page.select_option("#language", "english")
    page.fill("#instruct", "calm and slow")

    with page.expect_request(lambda r: r.url.endswith("/api/v1/custom-voice")) as sent:
        run = int(page.get_attribute("#result", "data-run") or 0) + 1
        page.click("#speak-button")
        page.locator('#result[data-state="streaming"][data-first-chunk-at]').wait_for(timeout=DONE)
        shot(page, "streaming")
        page.locator(f'#result[data-run="{run}"][data-state="done"]').wait_for(timeout=DONE)
    body = sent.value.post_data_json
    assert body["stream"] is True and body["response_format"] == "wav"
    sent_fields = (body["speaker"], body["language"], body["instruct"], body["text"])
    assert sent_fields == ("ryan", "english", "calm and slow", text)
    assert sent.value.headers["x-api-key"] == API_KEY

    marks = {key: float(value) for key, value in result_data(page).items() if key.endswith("At")}
    # the first audio was playing before the server finished the request
    assert marks["requestAt"] < marks["firstChunkAt"] <= marks["playbackAt"] < marks["endAt"], marks
    assert marks["endAt"] - marks["playbackAt"] > 100, f"the stream hardly lasted past the first chunk: {marks}"
    label = page.get_attribute("#waveform", "aria-label")
    seconds = float(re.search(r"([\d.]+) seconds", label).group(1))
    assert seconds > 1.0
    expect(page.locator("#result-stats")).to_contain_text("First audio after")
    shot(page, "streamed")

    # the WAV is kept in the browser: download it
    with page.expect_download() as download:
        page.click("#download-button")
    data = saved(download.value)
    assert data.startswith(b"RIFF") and abs(wav_seconds(data) - seconds) < 0.1

    # the history keeps it across a reload, with its audio
    page.reload()
    open_tab(page, "history")
    entry = page.locator("#history-list li").first
    expect(entry).to_contain_text(text)
    expect(entry).to_contain_text("Custom voice · ryan")
    expect(entry.locator("audio")).to_have_attribute("src", re.compile(r"^blob:"))
    duration = entry.locator("audio").evaluate(
        "(audio) => new Promise((ok) => { if (audio.duration) return ok(audio.duration);"
        " audio.onloadedmetadata = () => ok(audio.duration); audio.preload = 'metadata'; audio.load(); })"
    )
    assert abs(duration - seconds) < 0.1
    shot(page, "history")


def test_stop_cancels_a_stream(open_page):
    page = open_page()
    expect(page.locator("#speaker option")).not_to_have_count(0)
    page.fill("#text", words(200))
    page.click("#speak-button")
    page.locator('#result[data-state="streaming"]').wait_for(timeout=DONE)
    page.click("#stop-button")
    expect(page.locator("#result")).to_have_attribute("data-state", "stopped")
    expect(page.locator("#speak-progress")).to_have_text("Stopped.")
    expect(page.locator("#speak-button")).to_be_enabled()


def test_voice_design_whole_result_and_every_download_format(open_page, shot):
    page = open_page()
    expect(page.locator("#speaker option")).not_to_have_count(0)
    choose_mode(page, "voice_design")
    expect(page.locator("#design")).to_be_visible()
    expect(page.locator("#speaker")).to_be_hidden()
    page.fill("#design", "A warm, low voice, speaking slowly")
    page.fill("#text", "Welcome to the show.")
    page.click("details.options summary")
    page.uncheck("#stream")
    page.select_option("#format", "mp3")
    page.fill("#seed", "1234")
    speak(page)
    expect(page.locator("#result-stats")).to_contain_text("Server:")
    expect(page.locator("#result-stats")).to_contain_text("Model: Qwen3-TTS-12Hz-1.7B-VoiceDesign")
    expect(page.locator("#download-format")).to_have_value("mp3")
    shot(page, "design")

    for fmt in ("mp3", "wav", "flac", "opus", "aac", "pcm"):
        page.select_option("#download-format", fmt)
        with page.expect_download() as download:
            page.click("#download-button")
        data = saved(download.value)
        assert download.value.suggested_filename.endswith(f".{fmt}")
        if fmt == "pcm":
            assert len(data) > 1000 and len(data) % 2 == 0
        else:
            assert data.startswith(MAGIC[fmt]), (fmt, data[:8])


def test_voice_clone_from_a_recording_and_from_an_upload(open_page, shot):
    page = open_page()
    expect(page.locator("#speaker option")).not_to_have_count(0)
    choose_mode(page, "voice_clone")
    page.check('input[name="clone-source"][value="record"]')
    assert record(page, "#clone-recorder") >= 1.0
    page.fill("#ref-text", "A short test recording.")
    page.fill("#text", "Cloned from what I just recorded.")
    with page.expect_request(lambda r: r.url.endswith("/api/v1/voice-clone")) as sent:
        speak(page)
    body = sent.value.post_data_json
    assert body["ref_audio"].startswith("file-") and body["ref_text"] == "A short test recording."
    shot(page, "recording")

    page.check('input[name="clone-source"][value="upload"]')
    page.set_input_files("#clone-file", files=[{"name": "me.wav", "mimeType": "audio/wav", "buffer": sine_wav(2.0)}])
    page.fill("#ref-text", "")
    page.check("#x-vector")
    with page.expect_request(lambda r: r.url.endswith("/api/v1/voice-clone")) as sent:
        speak(page)
    assert sent.value.post_data_json["x_vector_only"] is True
    shot(page, "upload")


def test_voice_library_create_use_delete(server: Server, open_page, shot):
    page = open_page()
    open_tab(page, "voices")
    progress = page.locator("#voice-progress")

    page.fill("#voice-name", "recorded one")
    record(page, "#voice-recorder")
    page.fill("#voice-ref-text", "A short test recording.")
    page.click("#voice-create")
    expect(progress).to_contain_text("Created “recorded one”", timeout=DONE)

    page.fill("#voice-name", "clip-voice")
    page.check('input[name="voice-source"][value="upload"]')
    page.set_input_files("#voice-file", files=[{"name": "me.wav", "mimeType": "audio/wav", "buffer": sine_wav(2.0)}])
    page.click("#voice-create")
    expect(progress).to_contain_text("Created “clip-voice”", timeout=DONE)

    page.fill("#voice-name", "captain")
    page.check('input[name="voice-source"][value="design"]')
    page.fill("#voice-description", "A gruff, low voice, speaking slowly")
    page.select_option("#voice-language", "english")
    page.click("#voice-create")
    expect(progress).to_contain_text("Created “captain”", timeout=DONE)
    expect(progress.locator("audio")).to_have_attribute("src", re.compile(r"/api/v1/files/"))

    items = page.locator("#voice-list li")
    expect(items).to_have_count(3)
    expect(page.locator('#voice-list li[data-voice="captain"]')).to_contain_text("designed")
    with server.client() as client:
        names = [voice["name"] for voice in client.get("/api/v1/voices").json()["voices"]]
    assert names == ["recorded one", "clip-voice", "captain"]
    shot(page, "library")

    # a name the API refuses: its words
    page.fill("#voice-name", "captain")
    page.check('input[name="voice-source"][value="upload"]')
    page.set_input_files("#voice-file", files=[{"name": "me.wav", "mimeType": "audio/wav", "buffer": sine_wav(2.0)}])
    page.click("#voice-create")
    expect(page.locator("#voice-error")).to_contain_text("409")

    # use one: the Speak tab opens on cloning with that voice
    page.get_by_role("button", name="Use captain").click()
    expect(page.locator("#panel-speak")).to_be_visible()
    expect(page.locator('input[name="mode"][value="voice_clone"]')).to_be_checked()
    expect(page.locator("#clone-voice")).to_have_value("captain")
    page.fill("#text", "Good evening, crew.")
    with page.expect_request(lambda r: r.url.endswith("/api/v1/voice-clone")) as sent:
        speak(page)
    assert sent.value.post_data_json["voice"] == "captain"

    # delete one: asked once, done on the second click
    open_tab(page, "voices")
    delete = page.locator('#voice-list li[data-voice="clip-voice"] button', has_text="Delete")
    delete.click()
    expect(delete).to_have_text("Click again to delete")
    expect(delete).to_have_attribute("aria-label", "Click again to delete clip-voice")
    delete.click()
    expect(items).to_have_count(2)
    with server.client() as client:
        assert client.get("/api/v1/voices/clip-voice").status_code == 404
    shot(page, "deleted")


# ----- batch -----
def test_batch_job_to_completion(server: Server, open_page, shot):
    if not jobs_api(server):
        pytest.skip("this server has no jobs API (/api/v1/jobs) yet")
    page = open_page()
    open_tab(page, "batch")
    expect(page.locator("#batch-default option")).not_to_have_count(0)
    page.select_option("#batch-default", "vivian")
    page.select_option("#batch-format", "mp3")
    lines = ["ryan|The first line, by Ryan.", "A second line in the default voice.", "", "serena|And a third one."]
    page.fill("#batch-lines", "\n".join(lines))
    page.fill("#batch-label", "web test")
    with page.expect_request(lambda r: r.url.endswith("/api/v1/jobs") and r.method == "POST") as sent:
        page.click("#batch-submit")
    body = sent.value.post_data_json
    assert [item.get("speaker") for item in body["items"]] == ["ryan", None, "serena"]
    options = {"mode": "custom_voice", "language": "auto", "response_format": "mp3", "speaker": "vivian"}
    assert body["options"] == options
    assert [item["custom_id"] for item in body["items"]] == ["line-1", "line-2", "line-4"]

    card = page.locator("#batch-job")
    expect(card).to_be_visible()
    expect(card).to_have_attribute("data-status", "completed", timeout=DONE)
    events = dict(pair.split("=") for pair in card.get_attribute("data-events").split())
    assert int(events["progress"]) >= 1 and events["item"] == "3" and events["end"] == "1", events
    progress = page.locator("#batch-progress")
    assert (progress.get_attribute("value"), progress.get_attribute("max")) == ("3", "3")
    expect(page.locator("#batch-summary")).to_contain_text("Completed · 3 of 3 done")
    rows = page.locator("#batch-items li")
    expect(rows).to_have_count(3)
    expect(page.locator('#batch-items li[data-status="done"]')).to_have_count(3)
    expect(rows.first).to_contain_text("The first line, by Ryan.")
    src = rows.first.locator("audio").get_attribute("src")
    assert httpx.get(src, timeout=10).content[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")  # signed: no key needed
    expect(page.locator("#batch-cancel")).to_be_hidden()
    shot(page, "completed")

    with page.expect_download() as download:
        page.click("#batch-download")
    archive = zipfile.ZipFile(io.BytesIO(saved(download.value)))
    audio = [name for name in archive.namelist() if name.endswith(".mp3")]
    assert len(audio) == 3 and "manifest.json" in archive.namelist()

    # the job is still there after a reload
    page.reload()
    open_tab(page, "batch")
    expect(page.locator("#batch-summary")).to_contain_text("Completed · 3 of 3 done")


def test_batch_job_refused_shows_the_apis_words(server: Server, open_page):
    if not jobs_api(server):
        pytest.skip("this server has no jobs API (/api/v1/jobs) yet")
    page = open_page()
    open_tab(page, "batch")
    expect(page.locator("#batch-default option")).not_to_have_count(0)
    page.fill("#batch-lines", "")
    with server.client() as client:
        refused = client.post("/api/v1/jobs", json={"items": [], "options": {"mode": "custom_voice"}})
    page.click("#batch-submit")
    expect(page.locator("#batch-error")).to_contain_text(api_error(refused))
