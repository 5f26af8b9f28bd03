"""The batching policy on its own: merging within the window, chunking, error delivery."""

import asyncio

import pytest

from qwen_tts_server.engine.batcher import Batcher


def run(coro):
    return asyncio.run(coro)


def make(max_batch: int = 4, window_s: float = 0.05):
    calls: list[tuple[object, list[str]]] = []

    async def run_batch(key, items):
        calls.append((key, list(items)))
        await asyncio.sleep(0)
        if "boom" in items:
            raise RuntimeError("batch failed")
        return [f"{key}:{item}" for item in items]

    return Batcher(run_batch, max_batch=max_batch, window_s=window_s), calls


def test_concurrent_requests_within_the_window_share_one_batch():
    async def main():
        batcher, calls = make()
        a, b = await asyncio.gather(batcher.submit("k", ["a1", "a2"]), batcher.submit("k", ["b1"]))
        return a, b, calls

    a, b, calls = run(main())
    assert a == ["k:a1", "k:a2"] and b == ["k:b1"]
    assert calls == [("k", ["a1", "a2", "b1"])]


def test_different_keys_never_merge():
    async def main():
        batcher, calls = make()
        await asyncio.gather(batcher.submit("x", ["1"]), batcher.submit("y", ["2"]))
        return calls

    calls = run(main())
    assert sorted(calls) == [("x", ["1"]), ("y", ["2"])]


def test_a_list_larger_than_max_batch_is_split_in_order():
    async def main():
        batcher, calls = make(max_batch=3)
        out = await batcher.submit("k", [str(i) for i in range(7)])
        return out, calls, list(batcher.batch_sizes)

    out, calls, sizes = run(main())
    assert out == [f"k:{i}" for i in range(7)]
    assert [len(items) for _, items in calls] == [3, 3, 1]
    assert sizes == [3, 3, 1]


def test_a_failed_batch_fails_only_its_callers():
    async def main():
        batcher, _ = make(max_batch=1)
        return await asyncio.gather(
            batcher.submit("k", ["boom"]), batcher.submit("k", ["fine"]), return_exceptions=True
        )

    bad, good = run(main())
    assert isinstance(bad, RuntimeError) and good == ["k:fine"]


def test_cancelled_callers_are_skipped():
    async def main():
        batcher, calls = make(window_s=0.05)
        gone = asyncio.ensure_future(batcher.submit("k", ["gone"]))
        await asyncio.sleep(0.01)
        gone.cancel()
        kept = await batcher.submit("k", ["kept"])
        with pytest.raises(asyncio.CancelledError):
            await gone
        return kept, calls

    kept, calls = run(main())
    assert kept == ["k:kept"]
    assert calls == [("k", ["kept"])]
