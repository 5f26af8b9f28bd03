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


def test_one_engine_traces_at_a_time_and_a_stopped_loop_ends_its_trace(tmp_path):
    """The profiler is process-wide: a second engine's window that opens during the first's is skipped
    (its profiler would fail both); a loop that stops mid-window still closes the trace."""
    first, second = StepTrace(tmp_path / "a", after_steps=1, steps=5), StepTrace(tmp_path / "b", after_steps=1, steps=5)
    first.after_step()  # recording
    second.after_step()  # skipped, not raised
    for _ in range(2):
        second.after_step()
    first.close()  # the step loop ended two steps into the window
    assert first.written.wait(60) and list((tmp_path / "a").glob("steps-*.json"))
    assert not (tmp_path / "b").exists()
    third = StepTrace(tmp_path / "c", after_steps=1, steps=1)  # the profiler is free again
    third.after_step()
    third.after_step()
    assert third.written.wait(60) and list((tmp_path / "c").glob("steps-*.json"))
