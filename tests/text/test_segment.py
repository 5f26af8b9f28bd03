"""Sentence segmentation: split_text, split_sentences and SentenceBuffer."""

from __future__ import annotations

import random
import re

import pytest

from qwen_tts_server.text import (
    MAX_SEGMENT_CHARS,
    SentenceBuffer,
    normalize_whitespace,
    split_sentences,
    split_text,
)

CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")

ENGLISH = (
    "The old lighthouse stood at the edge of the cliff. For a hundred years it had guided ships home! "
    "Nobody remembered who built it. Was it the fishermen? Or the navy?!\n\n"
    "Mr. Hale, the keeper, said it cost 3.5 million dollars, e.g. more than the town. "
    'He laughed. "That was a lot of money." Then he went inside... and slept.'
)
CHINESE = "今天天气很好。我们去公园散步吧！你想一起来吗？好的，我马上就到；等我一下……"
JAPANESE = "こんにちは。今日はいい天気ですね！「はい。」と彼は答えた。どこへ行きますか？"


def cost(segment: str) -> int:
    return len(segment) + len(CJK.findall(segment))


def assert_rejoins(segments: list[str], text: str) -> None:
    """The segments, joined by a single space or by nothing, give `text` with whitespace normalised."""
    expected = normalize_whitespace(text)
    pos = 0
    for i, seg in enumerate(segments):
        assert seg and seg == seg.strip() and "  " not in seg and "\n" not in seg, seg
        if i and expected.startswith(" ", pos):
            pos += 1
        assert expected.startswith(seg, pos), (seg, expected[pos : pos + len(seg) + 10])
        pos += len(seg)
    assert pos == len(expected)


def stream(text: str, pieces: list[str], **kwargs) -> list[str]:
    buffer = SentenceBuffer(**kwargs)
    out = [seg for piece in pieces for seg in buffer.feed(piece)]
    return out + buffer.flush()


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 30)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


# --- split_sentences: where sentences end ---


def test_english_sentence_ends() -> None:
    assert split_sentences("It rained. We stayed in! Did you? Yes.") == [
        "It rained.",
        "We stayed in!",
        "Did you?",
        "Yes.",
    ]


def test_abbreviations_initials_and_decimals_do_not_end_sentences() -> None:
    text = (
        "Mr. Smith met Mrs. Jones and Dr. Who at St. Paul's. They paid $3.14, i.e. too much, e.g. for tea, "
        "etc. and more vs. less. J. K. Rowling lives in the U.S. Now. Version 2.0.1 is out."
    )
    assert split_sentences(text) == [
        "Mr. Smith met Mrs. Jones and Dr. Who at St. Paul's.",
        "They paid $3.14, i.e. too much, e.g. for tea, etc. and more vs. less.",
        "J. K. Rowling lives in the U.S. Now.",
        "Version 2.0.1 is out.",
    ]


def test_closing_quotes_and_brackets_stay_with_the_sentence() -> None:
    assert split_sentences('He said "Hi." Then he left.') == ['He said "Hi."', "Then he left."]
    assert split_sentences("(See above.) Next one.") == ["(See above.)", "Next one."]
    assert split_sentences("She wrote \u201cDone!\u201d Then she slept.") == [
        "She wrote \u201cDone!\u201d",
        "Then she slept.",
    ]
    # a lowercase word after the quote continues the sentence
    assert split_sentences('"Hi!" he said. "Bye?" she asked.') == ['"Hi!" he said.', '"Bye?" she asked.']


def test_runs_of_terminators() -> None:
    assert split_sentences("Really?! Yes... I think so. Wait... what? No!!! OK\u2026 Fine.") == [
        "Really?!",
        "Yes...",
        "I think so.",
        "Wait... what?",
        "No!!!",
        "OK\u2026",
        "Fine.",
    ]


def test_chinese_and_japanese_need_no_space() -> None:
    assert split_sentences(CHINESE) == [
        "今天天气很好。",
        "我们去公园散步吧！",
        "你想一起来吗？",
        "好的，我马上就到；",
        "等我一下……",
    ]
    assert split_sentences(JAPANESE) == [
        "こんにちは。",
        "今日はいい天気ですね！",
        "「はい。」と彼は答えた。",
        "どこへ行きますか？",
    ]
    assert split_sentences("「走吧。」「好。」") == ["「走吧。」", "「好。」"]


def test_mixed_scripts() -> None:
    assert split_sentences("Hello world. 你好世界。This is mixed! 你好!我是AI.") == [
        "Hello world.",
        "你好世界。",
        "This is mixed!",
        "你好!",
        "我是AI.",
    ]


def test_newlines() -> None:
    # a single newline is a space (hard-wrapped prose); a blank line ends the sentence
    assert split_sentences("Title\nFirst line goes\non here. Second.\n\nNew paragraph") == [
        "Title First line goes on here.",
        "Second.",
        "New paragraph",
    ]
    assert split_sentences("1. Buy milk.\n2. Buy eggs.\r\n\r\nDone") == ["1. Buy milk.", "2. Buy eggs.", "Done"]


# --- split_text: packing and sizes ---


@pytest.mark.parametrize("text", ["", " ", "\n\n\t  \r\n", "\u3000"])
def test_empty_input(text: str) -> None:
    assert split_text(text) == []
    assert split_sentences(text) == []
    assert stream(text, list(text)) == []


def test_short_text_is_one_segment_with_whitespace_normalised() -> None:
    assert MAX_SEGMENT_CHARS == 300
    assert split_text("  Hello   world.\t\tHow are\nyou?  ") == ["Hello world. How are you?"]


def test_sentences_are_packed_greedily() -> None:
    text = "One two three. Four five six. Seven eight nine. Ten."
    assert split_text(text, max_chars=30) == ["One two three. Four five six.", "Seven eight nine. Ten."]
    assert split_text(text, max_chars=14) == ["One two three.", "Four five six.", "Seven eight", "nine.", "Ten."]
    segments = split_text(ENGLISH, max_chars=120)
    assert all(len(s) <= 120 for s in segments)
    # no two neighbours within one paragraph would have fitted together
    assert all(
        len(a) + 1 + len(b) > 120 for a, b in zip(segments, segments[1:], strict=False) if not b.startswith("Mr.")
    )
    assert_rejoins(segments, ENGLISH)


def test_paragraph_break_always_ends_a_segment() -> None:
    assert split_text("First.\n\nSecond.") == ["First.", "Second."]
    assert split_text("First\n \n  Second") == ["First", "Second"]


def test_overlong_sentence_splits_at_clauses_then_spaces() -> None:
    clauses = [f"clause number {i} says a few words" for i in range(6)]
    sentence = ", ".join(clauses) + "."
    segments = split_text(sentence, max_chars=80)
    assert segments == [
        "clause number 0 says a few words, clause number 1 says a few words,",
        "clause number 2 says a few words, clause number 3 says a few words,",
        "clause number 4 says a few words, clause number 5 says a few words.",
    ]
    words = " ".join(f"word{i}" for i in range(40))  # no clause marks at all
    segments = split_text(f"Short one. Then {words}. Another short one.", max_chars=50)
    assert segments[0] == "Short one."
    assert segments[-1] == "Another short one."
    assert all(len(s) <= 50 for s in segments)
    assert all(len(s) > 40 for s in segments[1:-2])  # filled up to the limit
    assert_rejoins(segments, f"Short one. Then {words}. Another short one.")


def test_line_breaks_are_preferred_over_commas_in_an_overlong_sentence() -> None:
    text = "alpha, beta gamma delta\nepsilon, zeta eta theta"
    assert split_text(text, max_chars=30) == ["alpha, beta gamma delta", "epsilon, zeta eta theta"]


def test_cjk_counts_double() -> None:
    long_run = "字" * 500
    assert [len(s) for s in split_text(long_run)] == [150, 150, 150, 50]
    assert [len(s) for s in split_text(long_run, language="Chinese")] == [150, 150, 150, 50]
    # punctuated Chinese packs whole sentences into about half the character count
    text = CHINESE * 6
    segments = split_text(text, max_chars=60)
    assert all(cost(s) <= 60 and len(s) < 40 for s in segments)  # punctuation counts 1
    assert all(s[-1] in "。！？；…" for s in segments)
    assert_rejoins(segments, text)


def test_explicit_cjk_language_halves_the_limit_for_every_character() -> None:
    text = "abc de. " * 10
    assert max(len(s) for s in split_text(text, max_chars=40, language="korean")) <= 20
    assert max(len(s) for s in split_text(text, max_chars=40)) > 20


def test_long_cjk_sentence_splits_at_commas() -> None:
    text = "，".join(["我们今天一起去公园散步"] * 8) + "。"
    segments = split_text(text, max_chars=50)
    assert all(len(s) <= 25 for s in segments)
    assert all(s.endswith(("，", "。")) for s in segments)
    assert "".join(segments) == text


def test_invalid_max_chars() -> None:
    with pytest.raises(ValueError):
        split_text("Hi.", max_chars=0)
    with pytest.raises(ValueError):
        SentenceBuffer(max_chars=0)


# --- SentenceBuffer ---


def test_buffer_first_segment_is_one_sentence_as_soon_as_it_is_proven() -> None:
    buffer = SentenceBuffer(max_chars=100)
    assert buffer.feed("Hello there.") == []  # could be "Hello there.com" or "there. and"
    assert buffer.feed(" ") == []
    assert buffer.feed("How") == ["Hello there."]
    assert buffer.feed(" are you? I am fine. ") == []  # later segments pack sentences
    assert buffer.pending == "How are you? I am fine."
    assert buffer.flush() == ["How are you? I am fine."]


def test_buffer_cjk_sentence_end_is_proven_by_the_next_character() -> None:
    buffer = SentenceBuffer()
    assert buffer.feed("你好。") == []
    assert buffer.feed("我") == ["你好。"]
    assert buffer.flush() == ["我"]


def test_buffer_does_not_end_at_abbreviations() -> None:
    buffer = SentenceBuffer()
    assert buffer.feed("I saw Dr.") == []
    assert buffer.feed(" ") == []
    assert buffer.feed("Smith today. And") == ["I saw Dr. Smith today."]


def test_buffer_packs_later_sentences_until_the_next_does_not_fit() -> None:
    buffer = SentenceBuffer(max_chars=30)
    assert buffer.feed("First. ") == []
    assert buffer.feed("Second one. ") == ["First."]
    assert buffer.feed("Third one. ") == []
    assert buffer.feed("Fourth one is long. ") == ["Second one. Third one."]
    assert buffer.flush() == ["Fourth one is long."]


def test_buffer_emits_at_paragraph_break() -> None:
    buffer = SentenceBuffer()
    assert buffer.feed("One. Two. Three.") == ["One."]
    assert buffer.feed("\n") == []
    assert buffer.feed("\nFour") == ["Two. Three."]
    assert buffer.flush() == ["Four"]


def test_buffer_never_holds_more_than_max_chars_when_a_break_exists() -> None:
    text = " ".join(f"word{i}" for i in range(200)) + ", " + "字" * 300
    buffer = SentenceBuffer(max_chars=60)
    out = []
    for ch in text:
        out += buffer.feed(ch)
        assert cost(buffer.pending) <= 60
    out += buffer.flush()
    assert all(cost(s) <= 60 for s in out)
    assert_rejoins(out, text)


def test_buffer_flush_resets() -> None:
    buffer = SentenceBuffer()
    assert buffer.flush() == []
    assert buffer.feed("One. Two") == ["One."]
    assert buffer.flush() == ["Two"]
    assert buffer.pending == ""
    assert buffer.feed("Again. And") == ["Again."]  # eager again for a new text


@pytest.mark.parametrize("text", [ENGLISH, CHINESE * 3, JAPANESE * 3, ENGLISH + "\n\n" + CHINESE + " " + JAPANESE])
@pytest.mark.parametrize("max_chars", [20, 80, 300])
def test_buffer_char_by_char_gives_the_same_text(text: str, max_chars: int) -> None:
    whole = split_text(text, max_chars=max_chars)
    streamed = stream(text, list(text), max_chars=max_chars)
    assert_rejoins(whole, text)
    assert_rejoins(streamed, text)
    assert all(cost(s) <= max_chars for s in streamed)
    assert re.sub(r"\s", "", "".join(streamed)) == re.sub(r"\s", "", "".join(whole))


# --- the concatenation property on random text ---

ALPHABET = list("abcdefgh  ABC..,!?;:") + ["\n", "\n\n", " \r\n ", "...", "?!", "Dr.", "3.14", "e.g."]
ALPHABET += list("字文。，！？、；「」") + ['"', "'", ")", "\u2026", "\u2014", "\t"]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 120)))


@pytest.mark.parametrize("seed", range(10))
def test_random_text_rejoins(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        text = random_text(rng)
        max_chars = rng.choice([1, 2, 3, 5, 10, 25, 60, 300])
        language = rng.choice(["auto", "auto", "chinese", "english"])
        whole = split_text(text, max_chars=max_chars, language=language)
        assert_rejoins(whole, text)
        assert all(len(s) <= max_chars for s in whole)
        assert_rejoins(split_sentences(text), text)
        streamed = stream(text, random_pieces(text, rng), max_chars=max_chars, language=language)
        assert_rejoins(streamed, text)
        assert all(len(s) <= max_chars for s in streamed)
