"""Capture streams (qwen_tts_server/engine/fast/capture.py): no two live graph owners ever share one.

PyTorch's stream pool (32 per priority, handed out in turn) needs CUDA; here a pool of three stream-like
objects handed out in turn stands in for it, which is all `CaptureStreams` sees of it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from qwen_tts_server.engine.fast.capture import CaptureStreams


@dataclass(frozen=True)
class PoolStream:
    device_index: int
    cuda_stream: int


class Owner:  # a graph owner: frame graphs, codec or streaming decoder
    pass


def cycling_pool(size: int):
    handles = itertools.cycle(range(size))
    return lambda device: PoolStream(0, next(handles))


def test_a_stream_a_live_owner_holds_is_never_handed_out_again():
    streams = CaptureStreams(cycling_pool(3), pool_size=3)
    device = torch.device("cuda", 0)
    first, second = Owner(), Owner()
    a = streams.take(device, first)
    b = streams.take(device, second)
    assert a != b
    third = Owner()
    c = streams.take(device, third)  # the pool's next is free
    assert c not in (a, b)
    del second  # its stream is free again; the pool comes round to `a` first, which `first` holds
    d = streams.take(device, Owner())
    assert d == b


def test_when_every_stream_is_held_capture_fails_instead_of_sharing():
    streams = CaptureStreams(cycling_pool(2), pool_size=2)
    device = torch.device("cuda", 0)
    owners = [Owner(), Owner()]
    for owner in owners:
        streams.take(device, owner)
    with pytest.raises(RuntimeError, match="held by live graph owners"):
        streams.take(device, Owner())
