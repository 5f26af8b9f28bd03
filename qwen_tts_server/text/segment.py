"""Split text into segments a TTS model speaks well, for whole texts and for text that streams in.

Why: Qwen3-TTS, like other autoregressive TTS models, speaks best when it is given one to a few
sentences at a time. On long inputs prosody flattens, the voice wanders and words get dropped or
repeated, and time and memory grow with the length. So a long text is cut at sentence ends and the
sentences are packed into segments of at most ``max_chars``, which are generated one after another.
When text arrives piece by piece (tokens from an LLM), `SentenceBuffer` hands out each segment as
soon as it is known to be complete, so speech can start after the first sentence rather than after
the whole answer.

Whitespace: every run of whitespace becomes one space inside a segment and segments are stripped.
Segments joined with a single space (or with nothing, where a cut fell between two characters with
no space, as in Chinese and Japanese) give back the input with its whitespace normalised.

Breaks, strongest first; a segment is cut at the strongest break that keeps it within the limit:

1. Paragraph: a blank line (a whitespace run holding two or more line breaks). Always ends a segment.
2. Sentence end: a run of ``. ! ? …`` (so ``?!`` and ``...``) or of the CJK ``。！？；｡．``, with any
   closing quotes or brackets after it kept with the sentence (``He said "Hi." Then`` ends after the
   quote). After a Latin run, whitespace must follow, and not one of these:
   a lowercase word (``"Hi!" he said``, ``Wait... what``), a listed abbreviation (Mr. Mrs. Dr. St.
   e.g. i.e. etc. vs. and a few more), an initial (``J. K. Rowling``; not ``I``), a dotted acronym
   (``U.S.``) or a list number at the start of a line (``1. Buy milk``). Decimals (``3.14``) never
   split because no whitespace follows the point. Without whitespace a run ends a sentence when it
   holds a CJK mark or the next character is CJK (``你好!我``), except right after closing quotes,
   where only an opening quote or bracket may follow (``「はい。」と答えた`` stays one sentence). A run
   with whitespace (or nothing) before it ends nothing.
3. Line break: a single newline. Kept as a space, it is only used to cut an over-long sentence, so
   hard-wrapped prose is not cut at every line.
4. Clause punctuation: ``, ; :`` followed by whitespace; ``— –`` and the CJK ``，、：`` also without.
5. Whitespace.
6. Between any two characters: for a CJK run with neither spaces nor punctuation (or a very long word).

Sizes: consecutive sentences are packed greedily (fewest, fullest segments); a sentence is only cut
inside when it alone is over the limit, and then at the strongest lower break, packing the pieces the
same way. A CJK character (Han, kana, Hangul) carries about twice the speech of a Latin letter, so it
counts as 2 towards ``max_chars``: mostly-CJK text gets segments of about ``max_chars // 2``
characters, mixed text something in between. With ``language`` "chinese", "japanese" or "korean"
every character counts 2, that is segments of at most ``max_chars // 2`` characters.
"""

from __future__ import annotations

import bisect
import re
from itertools import accumulate
from typing import NamedTuple

MAX_SEGMENT_CHARS = 300

CJK_LANGUAGES = frozenset({"chinese", "japanese", "korean"})

# Break strengths, weakest first.
_CHAR, _SPACE, _CLAUSE, _LINE, _SENTENCE, _PARAGRAPH = range(6)

_CJK_CHARS = (
    "\u1100-\u11ff\u3005\u3007\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f"
)
_CJK_CHAR = re.compile(f"[{_CJK_CHARS}]")
_CJK_TERMINATORS = "。！？；｡．"
_CLOSERS = re.escape("\"'”’»›)]}）」』】〕》〉")
_OPENERS = "\"'“‘«‹([{（「『【〔《〈"

_TERMINATOR = re.compile(f"(?P<run>[.!?…{_CJK_TERMINATORS}]+)[{_CLOSERS}]*")
_CLAUSE_MARK = re.compile(f"(?P<mark>[,;:，、：—–])[{_CLOSERS}]*")
_NO_SPACE_CLAUSE_MARKS = "，、：—–"
_SEPARATOR = re.compile(r"\n\n|[ \n]")
_SEPARATOR_LEVEL = {" ": _SPACE, "\n": _LINE, "\n\n": _PARAGRAPH}

_WHITESPACE_RUN = re.compile(r"\s+")
_LINE_BREAK = re.compile(r"\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
_TOKEN_BEFORE = re.compile(r"[\w.]*$")
_ACRONYM = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st sr jr vs etc e.g i.e cf approx fig mt lt col gen capt sgt rev hon".split()  # noqa: SIM905
)


class _Cut(NamedTuple):
    """A place to cut: the left part ends at `end`, the right part starts at `next` (after a separator)."""

    end: int
    next: int
    level: int


def normalize_whitespace(text: str) -> str:
    """Every whitespace run as one space, no leading or trailing whitespace."""
    return _WHITESPACE_RUN.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` (paragraph breaks end sentences too), whitespace normalised, no size limit."""
    doc = _Text(double_all=False)
    doc.append(_canonical(text))
    if not doc.s:
        return []
    ends = [c for c in _find_cuts(doc.s, 0) if c.level >= _SENTENCE]
    starts = [0] + [c.next for c in ends]
    return [doc.segment(a, b) for a, b in zip(starts, [c.end for c in ends] + [len(doc.s)], strict=True)]


def split_text(text: str, *, max_chars: int = MAX_SEGMENT_CHARS, language: str = "auto") -> list[str]:
    """Split `text` into segments of whole sentences, each at most `max_chars` (CJK characters count 2)."""
    _check_max_chars(max_chars)
    doc = _Text(double_all=_is_cjk_language(language))
    doc.append(_canonical(text))
    if not doc.s:
        return []
    cuts = _find_cuts(doc.s, 0)
    splitter = _SpanSplitter(doc, cuts, max_chars)
    spans: list[tuple[int, int]] = []
    start = 0
    for cut in [c for c in cuts if c.level == _PARAGRAPH] + [_Cut(len(doc.s), len(doc.s), _PARAGRAPH)]:
        spans += splitter.split(start, cut.end, _SENTENCE)
        start = cut.next
    return [doc.segment(a, b) for a, b in spans]


class SentenceBuffer:
    """Collects text that arrives in pieces and hands out segments as soon as they are complete.

    A sentence end counts only once the character after it (past any whitespace) has arrived, since
    that character decides it (``Dr.`` then `` Smith``; ``Hi!`` then `` he said``). Latency policy:
    the first segment is the first complete sentence, so audio can start early; later segments pack
    sentences up to `max_chars` and go out once the next sentence cannot fit, at a paragraph break,
    or at `flush`. The text held back never exceeds `max_chars`: when it would, and no sentence end
    is in reach, the text is cut at the strongest line, clause or whitespace break within the limit.
    The segments carry the same text in the same order as `split_text` gives for the whole input,
    though possibly grouped differently. After `flush` the buffer is empty and can take a new text.
    """

    def __init__(self, max_chars: int = MAX_SEGMENT_CHARS, language: str = "auto") -> None:
        _check_max_chars(max_chars)
        self._max_chars = max_chars
        self._double_all = _is_cjk_language(language)
        self._reset()

    def _reset(self) -> None:
        self._doc = _Text(self._double_all)
        self._pending_space = ""  # raw whitespace after the last non-space character; its kind is not known yet
        self._pos = 0  # start of the text not yet handed out
        self._emitted = False

    @property
    def pending(self) -> str:
        """The text received but not handed out yet (whitespace normalised, trailing whitespace left out)."""
        return self._doc.segment(self._pos, len(self._doc.s))

    def feed(self, piece: str) -> list[str]:
        """Add `piece`; returns the segments that are complete now (often none)."""
        if not self._append(piece):
            return []
        return self._drain(final=False)

    def flush(self) -> list[str]:
        """End of input: returns all remaining segments and empties the buffer."""
        segments = self._drain(final=True)
        self._reset()
        return segments

    def _append(self, piece: str) -> bool:
        """Add `piece` to the canonical text; False when nothing but whitespace came."""
        raw = self._pending_space + piece
        body = raw.lstrip()
        if not body:
            self._pending_space = raw
            return False
        core = body.rstrip()
        self._pending_space = body[len(core) :]
        lead = raw[: len(raw) - len(body)]
        separator = _canonical_space(lead) if lead and self._doc.s else ""
        self._doc.append(separator + _canonical(core))
        return True

    def _drain(self, *, final: bool) -> list[str]:
        if sep := _SEPARATOR.match(self._doc.s, self._pos):  # a forced cut at the very end came before this space
            self._pos = sep.end()
        cuts = _find_cuts(self._doc.s, self._pos)
        segments = []
        while (cut := self._next_cut(cuts, final)) is not None:
            segments.append(self._doc.segment(self._pos, cut.end))
            self._pos = cut.next
            self._emitted = True
        return segments

    def _next_cut(self, cuts: list[_Cut], final: bool) -> _Cut | None:
        doc, start, n = self._doc, self._pos, len(self._doc.s)
        if start >= n:
            return None
        first = bisect.bisect_right(cuts, start, key=lambda c: c.end)
        fit = None  # the last sentence end within the limit
        for cut in cuts[first:]:
            if doc.cost(start, cut.end) > self._max_chars:
                break
            if cut.level >= _SENTENCE:
                fit = cut
                if cut.level == _PARAGRAPH or not self._emitted:
                    break
        overflow = doc.cost(start, n) > self._max_chars
        if final and not overflow and (fit is None or (fit.level < _PARAGRAPH and self._emitted)):
            fit = _Cut(n, n, _PARAGRAPH)
        if fit is not None and (fit.level == _PARAGRAPH or not self._emitted or overflow):
            return fit
        if fit is None and overflow:
            return self._cut_long(cuts[first:])
        return None

    def _cut_long(self, cuts: list[_Cut]) -> _Cut:
        """A cut in an over-long sentence: the last of the strongest breaks within the limit."""
        doc, start = self._doc, self._pos
        reach = doc.reach(start, self._max_chars, len(doc.s))
        in_reach = [c for c in cuts if c.end <= reach]
        if in_reach:
            strongest = max(c.level for c in in_reach)
            return [c for c in in_reach if c.level == strongest][-1]
        return doc.char_cut(max(reach, start + 1))


class _Text:
    """Canonical text (separators ' ', '\\n' or '\\n\\n', no outer whitespace) and prefix sums of char weights."""

    def __init__(self, double_all: bool) -> None:
        self.s = ""
        self._double_all = double_all
        self._prefix = [0]

    def append(self, text: str) -> None:
        self.s += text
        weights = (2 if self._double_all or _CJK_CHAR.match(ch) else 1 for ch in text)
        self._prefix += list(accumulate(weights, initial=self._prefix[-1]))[1:]

    def cost(self, a: int, b: int) -> int:
        return self._prefix[b] - self._prefix[a]

    def reach(self, a: int, budget: int, limit: int) -> int:
        """The farthest b <= limit with cost(a, b) <= budget."""
        return bisect.bisect_right(self._prefix, self._prefix[a] + budget, a, limit + 1) - 1

    def char_cut(self, i: int) -> _Cut:
        sep = _SEPARATOR.match(self.s, i)
        return _Cut(i, sep.end() if sep else i, _CHAR)

    def segment(self, a: int, b: int) -> str:
        return self.s[a:b].replace("\n", " ")


class _SpanSplitter:
    """Splits a span at the strongest breaks that bring every part within the limit, packing greedily."""

    def __init__(self, doc: _Text, cuts: list[_Cut], max_chars: int) -> None:
        self._doc = doc
        self._cuts = cuts
        self._ends = [c.end for c in cuts]
        self._max = max_chars

    def split(self, a: int, b: int, level: int) -> list[tuple[int, int]]:
        if self._doc.cost(a, b) <= self._max:
            return [(a, b)]
        if level == _CHAR:
            return self._split_chars(a, b)
        inner = self._cuts[bisect.bisect_right(self._ends, a) : bisect.bisect_left(self._ends, b)]
        breaks = [c for c in inner if c.level >= level]
        pieces = zip([a] + [c.next for c in breaks], [c.end for c in breaks] + [b], strict=True)
        return self._pack(pieces, level)

    def _pack(self, pieces, level: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        current: tuple[int, int] | None = None
        for a, b in pieces:
            if current is not None and self._doc.cost(current[0], b) <= self._max:
                current = (current[0], b)
                continue
            if current is not None:
                out.append(current)
                current = None
            if self._doc.cost(a, b) <= self._max:
                current = (a, b)
            else:
                out += self.split(a, b, level - 1)
        if current is not None:
            out.append(current)
        return out

    def _split_chars(self, a: int, b: int) -> list[tuple[int, int]]:
        out = []
        while a < b:
            end = max(self._doc.reach(a, self._max, b), a + 1)
            out.append((a, end))
            a = end
        return out


def _find_cuts(s: str, start: int) -> list[_Cut]:
    """Every break in `s` from `start` on, the strongest kind at each place, sorted by position.

    A break is only reported where the text after it decides it, so a prefix of a text has exactly
    the breaks of the whole text that lie inside it; `SentenceBuffer` relies on that.
    """
    best: dict[int, _Cut] = {}

    def add(cut: _Cut | None) -> None:
        if cut is not None and (cut.end not in best or best[cut.end].level < cut.level):
            best[cut.end] = cut

    for m in _SEPARATOR.finditer(s, start):
        add(_Cut(m.start(), m.end(), _SEPARATOR_LEVEL[m.group()]))
    for m in _TERMINATOR.finditer(s, start):
        add(_sentence_cut(s, m))
    for m in _CLAUSE_MARK.finditer(s, start):
        add(_clause_cut(s, m))
    return sorted(best.values())


def _sentence_cut(s: str, m: re.Match[str]) -> _Cut | None:
    i, run_end, j = m.start(), m.end("run"), m.end()
    if i == 0 or s[i - 1] in " \n" or j >= len(s):
        return None
    if s[j] in " \n":
        after = j + (2 if s.startswith("\n\n", j) else 1)  # canonical text never ends in whitespace
        if s[after].islower() or (m["run"] == "." and _is_abbreviation(s, i)):
            return None
        return _Cut(j, after, _SENTENCE)
    if j > run_end:  # closing quotes, then no space: only a new quote or bracket starts a sentence
        return _Cut(j, j, _SENTENCE) if s[j] in _OPENERS else None
    if any(ch in _CJK_TERMINATORS for ch in m["run"]) or _CJK_CHAR.match(s[j]):
        return _Cut(j, j, _SENTENCE)
    return None


def _clause_cut(s: str, m: re.Match[str]) -> _Cut | None:
    j = m.end()
    if j >= len(s):
        return None
    if s[j] in " \n":
        return _Cut(j, j + 1, _CLAUSE)
    return _Cut(j, j, _CLAUSE) if m["mark"] in _NO_SPACE_CLAUSE_MARKS else None


def _is_abbreviation(s: str, dot: int) -> bool:
    """Whether the '.' at `dot` closes an abbreviation, an initial, an acronym or a line-start list number."""
    token = _TOKEN_BEFORE.search(s, max(0, dot - 24), dot).group().lstrip(".")
    if token.lower() in _ABBREVIATIONS or _ACRONYM.fullmatch(token):
        return True
    if len(token) == 1 and token.isupper() and token != "I":
        return True
    if token.isdigit() and len(token) <= 3:
        before = dot - len(token)
        return before == 0 or s[before - 1] == "\n"
    return False


def _canonical_space(run: str) -> str:
    breaks = len(_LINE_BREAK.findall(run))
    return "\n\n" if breaks >= 2 else "\n" if breaks == 1 else " "


def _canonical(text: str) -> str:
    """`text` stripped, each whitespace run as ' ', '\\n' (one line break) or '\\n\\n' (a blank line)."""
    return _WHITESPACE_RUN.sub(lambda m: _canonical_space(m.group()), text.strip())


def _is_cjk_language(language: str) -> bool:
    return language.strip().lower() in CJK_LANGUAGES


def _check_max_chars(max_chars: int) -> None:
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
