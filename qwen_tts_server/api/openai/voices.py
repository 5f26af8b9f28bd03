"""The `voice` of a speech request: what it names, and how it is found.

Built-in speakers are matched case-insensitively, and OpenAI's voice names map to built-in speakers
(so clients that only know OpenAI's names still get a fitting voice). Named voices from the voice
library arrive later as another source in `VoiceLookup`: a name resolves to a speaker today, to a
stored cloning prompt then, and callers need not change.
"""

from __future__ import annotations

from dataclasses import dataclass

# OpenAI voice -> built-in speaker, by the voice's character (English-capable speakers first).
OPENAI_VOICES: dict[str, str] = {
    "alloy": "vivian",
    "ash": "ryan",
    "ballad": "aiden",
    "coral": "serena",
    "echo": "aiden",
    "fable": "ryan",
    "onyx": "uncle_fu",
    "nova": "vivian",
    "sage": "serena",
    "shimmer": "serena",
    "verse": "ryan",
    "marin": "vivian",
    "cedar": "aiden",
}


@dataclass(frozen=True)
class Voice:
    """A resolved voice: a built-in speaker of a CustomVoice model."""

    name: str  # as the client sent it
    speaker: str


class VoiceLookup:
    def __init__(self, speakers: tuple[str, ...]) -> None:
        self.speakers = tuple(s.lower() for s in speakers)

    def resolve(self, name: str) -> Voice | None:
        key = name.strip().lower()
        if key in self.speakers:
            return Voice(name, key)
        speaker = OPENAI_VOICES.get(key)
        if speaker is not None and speaker in self.speakers:
            return Voice(name, speaker)
        return None

    def names(self) -> list[str]:
        """Every name `resolve` accepts, speakers first."""
        return [*self.speakers, *(v for v, s in OPENAI_VOICES.items() if s in self.speakers)]
