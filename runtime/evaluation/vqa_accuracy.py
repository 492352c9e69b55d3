"""VQA accuracy (TextVQA, VQAv2): the answer normalisation and the 10-choose-9 soft score.

Reproduces the EvalAI answer processor that the official VQA evaluation and LLaVA's
`m4c_evaluator.TextVQAAccuracyEvaluator` use, rule for rule: lower case; "," and "?" dropped;
"'s" split off; punctuation removed (or turned into a space inside a word); periods dropped unless
a digit follows; number words zero..ten (and "none") to digits; articles a / an / the dropped;
apostrophe-less contractions restored ("dont" -> "don't"). A prediction scores, averaged over the
10 ways of leaving one human answer out, min(#remaining humans who gave it / 3, 1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The contractions the processor restores. A form with one apostrophe is looked up without it
# ("dont"); a form with several under each spelling missing exactly one ("couldnt've").
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's
they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
"""


def _contraction_table() -> dict[str, str]:
    table = {}
    for form in _CONTRACTIONS.split():
        cuts = [i for i, char in enumerate(form) if char == "'"]
        if len(cuts) == 1:
            table[form.replace("'", "")] = form
        else:
            for cut in cuts:
                table[form[:cut] + form[cut + 1 :]] = form
    table["somebody'd"] = "somebodyd"  # sic: the reference table maps this one backwards
    return table


CONTRACTIONS = _contraction_table()
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")


def normalise_vqa_answer(answer: str) -> str:
    """The EvalAI answer processor: 'The Two Dogs!' -> 'two dogs' -> '2 dogs'."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def _punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # Next to a space (or in a number with commas) a mark goes; inside a word it splits it.
        if f"{mark} " in text or f" {mark}" in text or _DIGIT_COMMA.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Soft accuracy in [0, 1] of `prediction` against the human answers (10 for TextVQA)."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalise_vqa_answer(prediction)
    answers = [normalise_vqa_answer(answer) for answer in human_answers]
    total = 0.0
    for left_out in range(len(answers)):
        others = answers[:left_out] + answers[left_out + 1 :]
        total += min(1.0, sum(answer == predicted for answer in others) / 3)
    return total / len(answers)
