"""A stream's chunk sizes and how far ahead of real time it is (the engine's use of them: test_codec_worker)."""

from __future__ import annotations

import pytest

from qwen_tts_server.engine.fast.chunking import lead_s, stream_chunk_sizes
from qwen_tts_server.engine.fast.sequence import AudioStream


def test_chunks_start_small_and_double_up_to_the_largest():
    assert stream_chunk_sizes(2, 12) == [2, 4, 8, 12]
    assert stream_chunk_sizes(3, 3) == [3]
    assert stream_chunk_sizes(5, 4) == [4]


def test_a_streams_lead_is_its_audio_handed_over_less_the_time_since_its_first_chunk():
    stream = AudioStream(on_audio=lambda *_: None, sent=25, first_sent_at=100.0)  # 2 s of audio handed over
    assert lead_s(stream, now=100.5) == pytest.approx(1.5)  # half a second in: 1.5 s ahead
    assert lead_s(stream, now=103.0) == pytest.approx(-1.0)  # three seconds in: behind
    assert lead_s(AudioStream(on_audio=lambda *_: None), now=5.0) == 0.0  # nothing sent yet
