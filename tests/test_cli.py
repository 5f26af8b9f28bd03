"""The CLI: test-model builder, one-off synthesis, model listing."""

from __future__ import annotations

import json

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
    assert json.loads(capsys.readouterr().err)["error"]["field"] == "speaker"


def test_models_list(tiny_models_dir, capsys):
    assert main(["models", "list", "--models-dir", str(tiny_models_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in rows} >= {"Qwen3-TTS-12Hz-1.7B-Base"}
    assert all(r["state"] == "available" and r["path"] for r in rows)
