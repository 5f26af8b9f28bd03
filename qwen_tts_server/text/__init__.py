"""Text handling before synthesis: cutting long or streamed text into segments the model speaks well."""

from qwen_tts_server.text.segment import (
    MAX_SEGMENT_CHARS,
    SentenceBuffer,
    normalize_whitespace,
    split_sentences,
    split_text,
)

__all__ = ["MAX_SEGMENT_CHARS", "SentenceBuffer", "normalize_whitespace", "split_sentences", "split_text"]
