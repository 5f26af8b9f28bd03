"""Owned streams (qwen_tts_server/engine/fast/capture.py): no two live owners ever share one, and a gone
owner's stream goes to the next owner (so cuBLAS workspaces, one per handle and stream, stop growing).

PyTorch's stream pool (32 per priority, handed out in turn) needs CUDA; here a pool of stream-like objects
handed out in turn stands in for it, which is all `StreamRegistry` sees of it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from qwen_tts_server.engine.fast.capture import StreamRegistry


@dataclass(frozen=True)
class PoolStream:
    device_index: int
    cuda_stream: int


class Owner:  # a graph owner: frame graphs, codec or streaming decoder
    pass


def cycling_pool(size: int):
    handles = {priority: itertools.cycle(range(size)) for priority in (-1, 0)}
    return lambda device, priority: PoolStream(0, 100 * priority + next(handles[priority]))


def test_a_stream_a_live_owner_holds_is_never_handed_out_again():
    streams = StreamRegistry(cycling_pool(3), pool_size=3)
    device = torch.device("cuda", 0)
    first, second, third = Owner(), Owner(), Owner()
    a = streams.take(device, first)
    b = streams.take(device, second)
    c = streams.take(device, third)
    assert len({a, b, c}) == 3
    del second  # the pool comes round to `a` first, which `first` holds; `b` is free again
    assert streams.take(device, Owner()) == b


def test_a_gone_owners_stream_goes_to_the_next_owner_in_the_same_role():
    """An engine built after another was unloaded gets the same streams in the same roles (its step thread
    the old step stream): the same (thread's cuBLAS handle, stream) pairs, so no new workspaces."""
    streams = StreamRegistry(cycling_pool(8), pool_size=8)
    device = torch.device("cuda", 0)
    engine, graphs = Owner(), Owner()
    step = streams.take(device, engine, priority=-1, role="step")
    codec = streams.take(device, engine, priority=0, role="codec")
    capture = streams.take(device, graphs, role="capture:FrameGraphs")
    del engine, graphs
    rebuilt, new_graphs = Owner(), Owner()
    assert streams.take(device, new_graphs, role="capture:FrameGraphs") == capture  # taken first, still its own
    assert streams.take(device, rebuilt, priority=-1, role="step") == step
    assert streams.take(device, rebuilt, priority=0, role="codec") == codec
    assert streams.take(device, rebuilt, priority=-1, role="step") not in (step, capture)  # held: a new one


def test_when_every_stream_is_held_capture_fails_instead_of_sharing():
    streams = StreamRegistry(cycling_pool(2), pool_size=2)
    device = torch.device("cuda", 0)
    owners = [Owner(), Owner()]
    for owner in owners:
        streams.take(device, owner)
    with pytest.raises(RuntimeError, match="held by live owners"):
        streams.take(device, Owner())
