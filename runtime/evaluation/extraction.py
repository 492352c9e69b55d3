"""Reading the answer out of free text: an option letter, or yes / no, in English or Chinese.

Models rarely answer with the bare letter the prompt asks for ("(B)", "The answer is B.",
"答案是B", or the option's text instead of its letter). Each function returns None when the text
names no answer, or names several; the scorers count those as unparsed (and wrong) instead of
guessing. The rules, in order, are listed in docs/EVALUATION.md and tested by a table of answers.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

# A letter alone or leading the reply: "B", "(B)", "B.", "B)", "B:", "B、", "[B]", "B. red".
_LEADING_LETTER = re.compile(r"^[(\[]?([A-Z])(?:[)\]]?\s*$|[)\]]?\s*[.:、)\]\-]|\s*\n)")
# "The answer is B", "answer: (C)", "correct option is D", "I choose option B", "Option B".
_ENGLISH_CUE = re.compile(
    r"(?i:answer|option|choice|choose|select)(?:\s+(?i:is|would be|should be|will be))?"
    r"\s*[:=]?\s*(?i:option\s+)?[(\[]?([A-Z])(?![A-Za-z])"
)
# "答案是B", "答案：B", "选B", "选择C", "应选 D", "正确答案为(A)", "选项B".
_CHINESE_CUE = re.compile(
    r"(?:答案|选项|选择|选)\s*(?:应该|应当|应)?\s*(?:是|为|选)?\s*[:：]?\s*[(（\[]?([A-Z])(?![A-Za-z])"
)
# A letter standing alone inside a sentence ("I think C is right").
_LONE_LETTER = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_WORD = re.compile(r"[a-z]+")
_VERBS_AFTER_LETTER = {"is", "and", "or", "was", "seems", "would", "should", "because", "fits"}

YES_WORDS = {"yes", "yeah", "yep", "true", "correct", "right"}
NO_WORDS = {"no", "nope", "not", "false", "incorrect", "wrong"}
NEGATIONS = {"no", "not", "none", "cannot", "nothing"}  # inside a sentence: "There is no dog."
# Chinese replies: a leading negation wins over a leading affirmation ("不是" starts with "不").
_CHINESE_NO_START = ("不是", "不对", "不存在", "不", "否", "没有", "没", "无", "错")
_CHINESE_YES_START = ("是", "对", "有", "存在", "正确", "确实", "嗯")
_CHINESE_NO_ANYWHERE = ("没有", "不是", "不存在", "并没有", "并非", "不能", "不会")
_CHINESE_YES_ANYWHERE = ("是的", "存在", "有")


def _clean(text: str) -> str:
    """NFKC (full-width "Ｂ" / "（" / "：" become ASCII), markdown emphasis and quotes removed."""
    text = unicodedata.normalize("NFKC", text)
    return re.sub(r"[*`\"“”‘’]", "", text).strip()


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter (a key of `options`) that `text` answers with, or None.

    Rules, first match wins: a letter alone or leading the reply; a cue ("answer is", "option",
    "答案是", "选"), the last cue counting; the text of exactly one option; exactly one letter of
    the options standing alone in the text (an article "A dog" / the pronoun "I" do not count).
    """
    text = _clean(text)
    if not text:
        return None
    match = _LEADING_LETTER.match(text)
    if match and match.group(1) in options:
        return match.group(1)
    cues = sorted((*_ENGLISH_CUE.finditer(text), *_CHINESE_CUE.finditer(text)), key=re.Match.start)
    cued = [m.group(1) for m in cues if m.group(1) in options]
    if cued:
        return cued[-1]
    by_text = _match_option_text(text, options)
    if by_text is not None:
        return by_text
    lone = {
        m.group(1)
        for m in _LONE_LETTER.finditer(text)
        if m.group(1) in options and not _is_english_word(text, m)
    }
    return lone.pop() if len(lone) == 1 else None


def _is_english_word(text: str, match: re.Match) -> bool:
    """ "I" as a pronoun ("I think"), or "A" as the article opening a sentence ("A red circle");
    "A is correct" and "A and B" keep their letters."""
    letter, rest = match.group(1), text[match.end() :]
    follower = re.match(r"\s+([a-z']+)", rest)
    if letter == "I":
        return follower is not None
    if letter != "A" or follower is None or follower.group(1) in _VERBS_AFTER_LETTER:
        return False
    before = text[: match.start()].rstrip()
    return not before or before[-1] in ".!?:\n"


def _match_option_text(text: str, options: Mapping[str, str]) -> str | None:
    """The one option whose text the reply is, or contains (whole words for Latin text)."""
    reply = _normalise_text(text)
    texts = {letter: _normalise_text(str(value)) for letter, value in options.items()}
    exact = [letter for letter, value in texts.items() if value and value == reply]
    if len(exact) == 1:
        return exact[0]
    found = [letter for letter, value in texts.items() if value and _contains(reply, value)]
    # "dark red" also contains the option "red": keep only options not inside another one found.
    found = [a for a in found if not any(a != b and texts[a] in texts[b] for b in found)]
    return found[0] if len(found) == 1 else None


def _normalise_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.strip().rstrip(".。!！").split())


def _contains(reply: str, option: str) -> bool:
    if option.isascii():
        return re.search(rf"(?<![a-z0-9]){re.escape(option)}(?![a-z0-9])", reply) is not None
    return option in reply


def extract_yes_no(text: str) -> str | None:
    """ "yes", "no", or None. The first word decides ("Yes, ...", "No.", "是的", "不是"); else a
    reply holding only one of the two ("There is no dog." -> no), else None."""
    text = _clean(text).lower().lstrip("([{-—:,.，。 \n")
    if not text:
        return None
    for prefix in _CHINESE_NO_START:
        if text.startswith(prefix):
            return "no"
    for prefix in _CHINESE_YES_START:
        if text.startswith(prefix):
            return "yes"
    words = _WORD.findall(text)
    if words and words[0] in YES_WORDS:
        return "yes"
    if words and words[0] in NO_WORDS:
        return "no"
    chinese_no = any(phrase in text for phrase in _CHINESE_NO_ANYWHERE)
    # "有" is also inside "没有": a negation anywhere rules the Chinese affirmations out.
    chinese_yes = not chinese_no and any(phrase in text for phrase in _CHINESE_YES_ANYWHERE)
    said_no = chinese_no or bool(NEGATIONS & set(words)) or "n't" in text
    said_yes = chinese_yes or "yes" in words
    if said_no != said_yes:
        return "no" if said_no else "yes"
    return None
