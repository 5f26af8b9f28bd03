"""The CLI: test-model builder, one-off synthesis, model listing and download, one-line errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import soundfile as sf

from qwen_tts_server.cli import main


def test_make_test_models_writes_the_published_names(tmp_path, capsys):
    assert main(["make-test-models", str(tmp_path / "m")]) == 0
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == sorted(
        [
            "Qwen3-TTS-12Hz-0.6B-CustomVoice",
            "Qwen3-TTS-12Hz-1.7B-CustomVoice",
            "Qwen3-TTS-12Hz-1.7B-VoiceDesign",
            "Qwen3-TTS-12Hz-0.6B-Base",
            "Qwen3-TTS-12Hz-1.7B-Base",
        ]
    )
    for name in names:
        assert (tmp_path / "m" / name / "config.json").is_file()
        assert (tmp_path / "m" / name / "speech_tokenizer" / "model.safetensors").is_file()


def test_synth_writes_audio(tiny_models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QTTS_DOWNLOAD_SOURCE", "none")
    out = tmp_path / "hello.flac"
    code = main(
        [
            "synth",
            "custom-voice",
            "--text",
            "Hello.",
            "--speaker",
            "ryan",
            "--out",
            str(out),
            "--format",
            "flac",
            "--models-dir",
            str(tiny_models_dir),
            "--data-dir",
            str(tmp_path / "d"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    samples, rate = sf.read(out)
    assert rate == 24000 and len(samples) > 0
    assert "wrote" in capsys.readouterr().out


def test_synth_reports_bad_input(tiny_models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QTTS_DOWNLOAD_SOURCE", "none")
    code = main(
        [
            "synth",
            "custom-voice",
            "--text",
            "Hi",
            "--speaker",
            "nobody",
            "--out",
            str(tmp_path / "x.wav"),
            "--models-dir",
            str(tiny_models_dir),
            "--data-dir",
            str(tmp_path / "d"),
            "--device",
            "cpu",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: speaker 'nobody' is not available")
    assert err.rstrip().endswith("(field: speaker)")


def test_models_list(tiny_models_dir, capsys):
    assert main(["models", "list", "--models-dir", str(tiny_models_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in rows} >= {"Qwen3-TTS-12Hz-1.7B-Base"}
    assert all(r["state"] == "available" and r["path"] for r in rows)


def one_line_error(text: str) -> str:
    assert text.count("\n") == 1 and text.startswith("error: "), text
    return text


def test_models_download_of_an_unknown_name_is_one_line_and_asks_no_hub(tmp_path, capsys):
    code = main(["models", "download", "evil-user/Qwen3-TTS-12Hz-1.7B-Base", "--models-dir", str(tmp_path / "m")])
    assert code == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert "not known to this server" in one_line_error(out.err) and "configured organisation 'Qwen'" in out.err
    assert not (tmp_path / "m").exists()


def test_models_download_with_downloads_off_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QTTS_DOWNLOAD_SOURCE", "none")
    assert main(["models", "download", "Qwen3-TTS-12Hz-0.6B-Base", "--models-dir", str(tmp_path / "m")]) == 1
    assert "downloads are disabled" in one_line_error(capsys.readouterr().err)
    assert main(["models", "download"]) == 2
    assert "needs a NAME" in one_line_error(capsys.readouterr().err)


def test_models_download_finds_a_local_model(tiny_models_dir, capsys):
    assert main(["models", "download", "Qwen/Qwen3-TTS-12Hz-0.6B-Base", "--models-dir", str(tiny_models_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_models_dir / "Qwen3-TTS-12Hz-0.6B-Base")


def test_serve_says_where_it_listens(tmp_path, monkeypatch, capsys):
    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(kw))
    monkeypatch.setenv("QTTS_LOG_JSON", "false")
    logger = logging.getLogger("qwen_tts_server")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        assert main(["serve", "--port", "8123", "--models-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path)]) == 0
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
    assert started == {"host": "127.0.0.1", "port": 8123, "log_level": "warning"}
    assert "listening on http://127.0.0.1:8123; API docs at http://127.0.0.1:8123/docs" in capsys.readouterr().err


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = os.environ | {"QTTS_DEVICE": "cpu", **env}
    command = [sys.executable, "-m", "qwen_tts_server.cli", *args]
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_real_process_prints_no_upstream_noise_and_one_line_errors(tiny_models_dir, tmp_path):
    """Upstream's import-time noise (SoX, flash-attn) is gone, and a failure is one line, no traceback."""
    synth = run_cli(
        "synth", "custom-voice", "--text", "Hi", "--speaker", "nobody", "--out", str(tmp_path / "x.wav"),
        "--models-dir", str(tiny_models_dir), "--data-dir", str(tmp_path / "d"), QTTS_DOWNLOAD_SOURCE="none",
    )  # fmt: skip
    assert synth.returncode == 1 and synth.stdout == "", synth.stdout
    assert "speaker 'nobody'" in one_line_error(synth.stderr)
    for noise in ("SoX", "sox", "flash-attn", "Traceback"):
        assert noise not in synth.stdout + synth.stderr
    # The real hub client, offline: a download that cannot happen is one line too.
    download = run_cli(
        "models", "download", "Qwen3-TTS-12Hz-0.6B-Base", "--models-dir", str(tmp_path / "m"), HF_HUB_OFFLINE="1"
    )
    assert download.returncode == 1, download.stderr
    lines = [line for line in download.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "could not be downloaded from huggingface (Qwen/Qwen3-TTS-12Hz-0.6B-Base)" in lines[0]
    assert "Traceback" not in download.stderr
