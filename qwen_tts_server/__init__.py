"""Qwen3-TTS server: custom voice, voice design and voice cloning over HTTP."""

__version__ = "0.1.0"
