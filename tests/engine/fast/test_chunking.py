"""A stream's chunk sizes and how far ahead of real time it is (the engine's use of them: test_codec_worker)."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_server.engine.fast.chunking import StreamChunker, lead_s, stream_chunk_sizes
from qwen_tts_server.engine.fast.sequence import AudioStream
from qwen_tts_server.engine.types import Mode

from .test_engine import CUSTOM, GREEDY, custom_items, make_seq


def test_chunks_start_small_and_double_up_to_the_largest():
    assert stream_chunk_sizes(2, 12) == [2, 4, 8, 12]
    assert stream_chunk_sizes(3, 3) == [3]
    assert stream_chunk_sizes(5, 4) == [4]


def test_a_streams_lead_is_its_audio_handed_over_less_the_time_since_its_first_chunk():
    stream = AudioStream(on_audio=lambda *_: None, sent=25, first_sent_at=100.0)  # 2 s of audio handed over
    assert lead_s(stream, now=100.5) == pytest.approx(1.5)  # half a second in: 1.5 s ahead
    assert lead_s(stream, now=103.0) == pytest.approx(-1.0)  # three seconds in: behind
    assert lead_s(AudioStream(on_audio=lambda *_: None), now=5.0) == 0.0  # nothing sent yet


def test_a_stream_nobody_listens_to_goes_in_the_largest_chunks_all_patient_but_its_last(load_tts):
    """A whole utterance decoded while it runs: no small first chunks (nobody waits for its first audio) and no
    lead to keep (nobody plays it), so each chunk may wait for other streams' in the codec thread."""
    tts = load_tts(CUSTOM)
    chunker = StreamChunker([2, 4, 8], wait_s=0.1)
    whole, heard = (make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY) for item in custom_items()[:2])
    whole.stream, heard.stream = AudioStream(), AudioStream(on_audio=lambda *_: None)
    for seq in (whole, heard):
        seq.frames = [torch.zeros(16, dtype=torch.long)] * 13
    jobs = chunker.chunks([whole, heard], now=0.0) + chunker.chunks([whole, heard], now=0.0)
    assert [(job.seq, job.start, job.end, job.patient) for job in jobs] == [
        (whole, 0, 8, True),
        (heard, 0, 2, False),
        (heard, 2, 6, False),  # the whole utterance's next 8 frames do not exist yet
    ]
    last = chunker.last(whole)
    assert (last.start, last.end, last.final, last.patient) == (8, 13, True, False)
