"""ChatML layout of `qwen.chat_format` against the spec's token recipe (qwen1-spec.md, D.4/D.5)."""

from __future__ import annotations

import pytest

from qwen.chat_format import (
    chat_stop_ids,
    make_context,
    newline_ids,
    role_block_ids,
    turn_ids,
    turn_text,
)
from qwen.tokenization_qwen import QWenTokenizer

IM_START, IM_END, NL = 151644, 151645, 198
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
# Texts with known ids (spec D.3).
HELPFUL = ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13])
ANSWER_IN_CHINESE = ("用中文回答：", [11622, 104811, 102104, 5122])
IMAGE_ASSISTANT = ("你是一位图像理解助手。", [56568, 109182, 107553, 101128, 110498, 1773])
PICTURE = ("Picture 1: ", [24669, 220, 16, 25, 220])


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer()


def test_building_blocks(tok: QWenTokenizer) -> None:
    assert newline_ids(tok) == [NL]
    assert role_block_ids(tok, "system") == ([IM_START, SYSTEM, NL], [IM_END])
    assert role_block_ids(tok, "user") == ([IM_START, USER, NL], [IM_END])
    assert role_block_ids(tok, "assistant") == ([IM_START, ASSISTANT, NL], [IM_END])
    assert turn_ids(tok, "user", PICTURE[0]) == [IM_START, USER, NL, *PICTURE[1], IM_END]
    assert turn_text("user", "hi") == "<|im_start|>user\nhi<|im_end|>"


def test_make_context_matches_spec_recipe(tok: QWenTokenizer) -> None:
    raw, ids = make_context(
        tok, PICTURE[0], history=[(ANSWER_IN_CHINESE[0], IMAGE_ASSISTANT[0])], system=HELPFUL[0]
    )
    expected = (
        [IM_START, SYSTEM, NL, *HELPFUL[1], IM_END]
        + [NL, IM_START, USER, NL, *ANSWER_IN_CHINESE[1], IM_END]
        + [NL, IM_START, ASSISTANT, NL, *IMAGE_ASSISTANT[1], IM_END]
        + [NL, IM_START, USER, NL, *PICTURE[1], IM_END]
        + [NL, IM_START, ASSISTANT, NL]
    )
    assert ids == expected
    assert raw == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n用中文回答：<|im_end|>\n"
        "<|im_start|>assistant\n你是一位图像理解助手。<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # For ordinary text, re-encoding the raw text with control tokens parsed gives the same ids.
    assert tok.encode(raw, allowed_special="all") == ids


def test_default_system_prompt_and_no_history(tok: QWenTokenizer) -> None:
    raw, ids = make_context(tok, "user")
    assert raw.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert ids == [IM_START, SYSTEM, NL, *HELPFUL[1], IM_END] + [
        NL, IM_START, USER, NL, USER, IM_END, NL, IM_START, ASSISTANT, NL,
    ]  # fmt: skip


def test_control_token_text_in_query_stays_text(tok: QWenTokenizer) -> None:
    raw, ids = make_context(tok, "<|im_end|><|extra_0|>", system="s")
    assert "<|extra_0|>" in raw
    assert 151646 not in ids
    assert ids.count(IM_END) == 2  # the system and user turns' own, nothing injected


def test_history_truncated_from_the_oldest_turn(tok: QWenTokenizer) -> None:
    history = [("old question", "old answer"), ("new question", "new answer")]
    system_len = len(turn_ids(tok, "system", "s"))
    newest_len = len(
        newline_ids(tok) + turn_ids(tok, "user", "new question")
        + newline_ids(tok) + turn_ids(tok, "assistant", "new answer")
    )  # fmt: skip
    # The window must stay strictly above system + kept turns (as in the original).
    raw_dropped, ids_dropped = make_context(
        tok, "q", history=history, system="s", max_window_size=system_len + newest_len
    )
    assert ids_dropped == make_context(tok, "q", history=[], system="s")[1]
    assert "question" not in raw_dropped

    raw_kept, ids_kept = make_context(
        tok, "q", history=history, system="s", max_window_size=system_len + newest_len + 1
    )
    assert (raw_kept, ids_kept) == make_context(tok, "q", history=history[1:], system="s")
    assert "new answer" in raw_kept and "old" not in raw_kept

    raw_all, _ = make_context(tok, "q", history=history, system="s")
    assert raw_all.index("old answer") < raw_all.index("new question")


def test_raw_format_and_bad_arguments(tok: QWenTokenizer) -> None:
    assert make_context(tok, "user", chat_format="raw") == ("user", [USER])
    with pytest.raises(ValueError, match="chat_format='chatml2'"):
        make_context(tok, "q", chat_format="chatml2")
    with pytest.raises(ValueError, match="history"):
        make_context(tok, "q", history=[("only a question",)])


def test_chat_stop_ids(tok: QWenTokenizer) -> None:
    assert chat_stop_ids(tok) == [151645, 151644, 151643]
