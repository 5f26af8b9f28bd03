"""text.checks: the rules for text no speech can come from (the API's 422s for them are in tests/api)."""

from __future__ import annotations

import pytest

from qwen_tts_server.errors import InvalidRequest
from qwen_tts_server.text.checks import TEXT_SLICE, check_text, checked_text_in_slices


def test_long_base64_text_takes_the_ascii_path_and_still_finds_a_control_character():
    text = "QUJD" * 7_000_000  # 28 M characters, the size of a 20 MB clip in base64
    assert check_text(text) is text
    with pytest.raises(Exception, match="control character U\\+0000 at index 27999999"):
        check_text(text[:-1] + "\0")
    assert check_text("QUJD\nQUJD\r\n" * 10_000)  # MIME line breaks are fine


def test_checking_in_slices_reports_the_index_in_the_whole_text():
    text = "a" * (TEXT_SLICE + 5) + "\ufffe"
    with pytest.raises(
        InvalidRequest, match=f"ref_audio has the Unicode noncharacter U\\+FFFE at index {TEXT_SLICE + 5}"
    ):
        checked_text_in_slices("ref_audio", text)
    assert checked_text_in_slices("ref_audio", "a" * (TEXT_SLICE + 5)) == "a" * (TEXT_SLICE + 5)
