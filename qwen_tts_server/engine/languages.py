"""Language names and ISO codes as clients send them, mapped to the names checkpoints use."""

from __future__ import annotations

# ISO 639-1 codes (and a few common tags) -> the language names in the checkpoints' config.
LANGUAGE_ALIASES: dict[str, str] = {
    "auto": "auto",
    "en": "english",
    "zh": "chinese",
    "cn": "chinese",
    "ja": "japanese",
    "jp": "japanese",
    "ko": "korean",
    "kr": "korean",
    "de": "german",
    "fr": "french",
    "ru": "russian",
    "pt": "portuguese",
    "es": "spanish",
    "it": "italian",
}

KNOWN_LANGUAGES = (
    "auto",
    "chinese",
    "english",
    "german",
    "italian",
    "portuguese",
    "spanish",
    "japanese",
    "korean",
    "french",
    "russian",
)


def normalize_language(value: str | None) -> str | None:
    """Return the canonical lowercase name for a language name or code, or None if unknown.

    Region tags are accepted (`en-US`, `pt_BR`): the part before the separator decides.
    """
    if value is None:
        return "auto"
    key = value.strip().lower()
    if not key:
        return "auto"
    if key in KNOWN_LANGUAGES:
        return key
    if key in LANGUAGE_ALIASES:
        return LANGUAGE_ALIASES[key]
    base = key.replace("_", "-").split("-", 1)[0]
    return LANGUAGE_ALIASES.get(base)
