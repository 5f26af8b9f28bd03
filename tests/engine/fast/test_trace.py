"""`QTTS_TRACE_DIR`: the step thread traces the configured window of steps and writes it out."""

from __future__ import annotations

import json
import threading

from qwen_tts_server.engine.fast.engine import FastEngine
from qwen_tts_server.engine.fast.trace import StepTrace
from qwen_tts_server.engine.types import Mode, SynthesisItem

from .test_engine import CUSTOM, GREEDY, LONG, make_seq


def test_the_step_thread_traces_its_window_of_steps(load_tts, tmp_path):
    tts = load_tts(CUSTOM)
    trace = StepTrace(tmp_path / "trace", after_steps=2, steps=3)
    engine = FastEngine(tts, max_slots=2, max_len=256, trace=trace)
    done = threading.Event()
    item = SynthesisItem(text=LONG, language="english", speaker="ryan")  # runs past 5 steps (test_engine)
    engine.submit(make_seq(tts, Mode.CUSTOM_VOICE, item, GREEDY, on_finish=lambda s: done.set()))
    engine.start()
    try:
        assert done.wait(60)
    finally:
        engine.stop()
    assert trace.written.wait(60)
    traces = list((tmp_path / "trace").glob("steps-*.json"))
    assert len(traces) == 1 and trace.count >= 5
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)  # the steps' own work is in it
    assert "Self CPU" in traces[0].with_suffix(".txt").read_text()
