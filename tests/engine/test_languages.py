import pytest

from qwen_tts_server.engine.languages import normalize_language


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("english", "english"),
        ("English", "english"),
        ("EN", "english"),
        ("en-US", "english"),
        ("pt_BR", "portuguese"),
        ("zh", "chinese"),
        ("ja", "japanese"),
        ("ko", "korean"),
        ("de", "german"),
        ("fr", "french"),
        ("ru", "russian"),
        ("es", "spanish"),
        ("it", "italian"),
        ("Auto", "auto"),
        ("", "auto"),
        (None, "auto"),
    ],
)
def test_names_and_codes(given, expected):
    assert normalize_language(given) == expected


@pytest.mark.parametrize("given", ["klingon", "nl", "xx-YY"])
def test_unknown_languages_are_none(given):
    assert normalize_language(given) is None
