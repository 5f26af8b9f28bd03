"""LRU cache of voice-clone prompts, keyed by (model, the reference audio's content hash).

The key is `sha256:<hex>` of the audio file's bytes (audio.sources.ReferenceAudio.cache_key),
whichever way they arrived, so a file_id and base64 of the same bytes share one entry. Transcript
and mode are not in the key: the prompt (speaker embedding and reference codes) does not depend on
them; they travel on each SynthesisItem.

Computing a prompt runs the codec encoder and the speaker encoder; a batch of N items that share
one reference, and later requests with the same `file_id`, reuse one computation. Concurrent
requests for the same key wait for the one computation in flight instead of starting another.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from .types import VoicePrompt

CacheKey = tuple[str, str]  # (model name, `sha256:<hex of the audio bytes>`)


class VoicePromptCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, VoicePrompt] = OrderedDict()
        self._inflight: dict[CacheKey, asyncio.Task[VoicePrompt]] = {}
        self.hits = 0
        self.misses = 0

    async def get_or_compute(
        self, key: CacheKey, compute: Callable[[], Awaitable[VoicePrompt]]
    ) -> tuple[VoicePrompt, bool]:
        """The prompt for `key` and whether it was already there (or being computed).

        The computation runs in a task of its own: a caller that goes away (cancelled) does not
        cancel it for the other callers waiting on the same reference.
        """
        prompt = self._entries.get(key)
        if prompt is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return prompt, True
        task = self._inflight.get(key)
        hit = task is not None
        if task is None:
            self.misses += 1
            task = asyncio.ensure_future(self._compute(key, compute))
            self._inflight[key] = task
        else:
            self.hits += 1
        return await asyncio.shield(task), hit

    async def _compute(self, key: CacheKey, compute: Callable[[], Awaitable[VoicePrompt]]) -> VoicePrompt:
        try:
            prompt = await compute()
        finally:
            self._inflight.pop(key, None)
        self._entries[key] = prompt
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return prompt

    def drop_model(self, model: str) -> None:
        """Prompts are tensors on the model's device: drop them when the model unloads."""
        for key in [k for k in self._entries if k[0] == model]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
