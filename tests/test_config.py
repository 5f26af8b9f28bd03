"""Settings read from the environment: the options whose values need more than pydantic's own parsing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from qwen_tts_server.config import Settings


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (None, "snake"),
        ("snake", "snake"),
        ("step", "step"),
        ("off", "off"),
        ("true", "step"),  # once a switch for the whole step: its old values keep their meaning
        ("1", "step"),
        ("false", "off"),
        ("0", "off"),
        ("Y", "step"),
        (" Snake ", "snake"),
        ("STEP", "step"),
    ],
)
def test_compile_codec_reads_its_names_and_its_old_switch_values(monkeypatch, env, expected):
    monkeypatch.delenv("QTTS_COMPILE_CODEC", raising=False)
    if env is not None:
        monkeypatch.setenv("QTTS_COMPILE_CODEC", env)
    assert Settings().compile_codec == expected


def test_an_unknown_compile_codec_says_what_it_may_be(monkeypatch):
    monkeypatch.setenv("QTTS_COMPILE_CODEC", "fast")
    with pytest.raises(ValidationError, match="'off', 'snake' or 'step'"):
        Settings()


@pytest.mark.parametrize(("value", "expected"), [(True, "step"), (False, "off"), (1, "step"), (0, "off")])
def test_compile_codec_given_as_a_python_bool(value, expected):
    assert Settings(compile_codec=value).compile_codec == expected


def test_fused_attention_is_every_layers_unless_asked_and_an_unknown_mode_says_what_it_may_be(monkeypatch):
    monkeypatch.delenv("QTTS_FUSED_ATTENTION", raising=False)
    assert Settings().fused_attention == "all"
    for mode in ("off", "predictor"):
        monkeypatch.setenv("QTTS_FUSED_ATTENTION", mode)
        assert Settings().fused_attention == mode
    monkeypatch.setenv("QTTS_FUSED_ATTENTION", "talker")
    with pytest.raises(ValidationError, match="'off', 'predictor' or 'all'"):
        Settings()


def test_the_settings_load_without_torch() -> None:
    """config.py takes the engine's choices and defaults from engine/fast/options.py, which must stay torch-free:
    the CLI's help and the settings' checks should not wait for torch (seconds) nor need it installed."""
    code = "import sys, qwen_tts_server.config as c; c.Settings(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"
