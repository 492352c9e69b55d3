"""ChatML rendering, the label rule, image placeholder expansion and the truncation rule."""

from __future__ import annotations

import pytest

from dataset.conversation import (
    IGNORE_INDEX,
    EncodedConversation,
    encode_conversation,
    encode_text,
    fit_to_length,
)

IMAGE_ID = 151646  # <|extra_0|>
N = 4


def _supervised_runs(labels: list[int]) -> list[list[int]]:
    """Contiguous runs of supervised label ids."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs


def _encode(tokenizer, roles, contents, **kwargs) -> EncodedConversation:
    return encode_conversation(
        tokenizer, roles, contents, image_token_id=IMAGE_ID, num_image_tokens=N, **kwargs
    )


def test_labels_are_exactly_the_answers_and_their_im_end(tokenizer):
    roles = ["user", "assistant", "user", "assistant"]
    contents = ["<image>\nWhat colour?", "red", "And the shape? 中文", "一个圆形 circle"]
    sample = _encode(tokenizer, roles, contents)
    assert len(sample.labels) == len(sample.input_ids)
    runs = _supervised_runs(sample.labels)
    assert [tokenizer.decode(run) for run in runs] == [
        "red<|im_end|>",
        "一个圆形 circle<|im_end|>",
    ]
    # Supervised labels equal the input ids at the same positions (aligned, not shifted).
    for position, label in enumerate(sample.labels):
        if label != IGNORE_INDEX:
            assert sample.input_ids[position] == label
    assert sample.input_ids[-1] == tokenizer.im_end_id  # no trailing unsupervised "\n"


def test_prompt_prefix_equals_make_context(tokenizer):
    from qwen.chat_format import make_context

    roles = ["user", "assistant", "user", "assistant"]
    contents = ["Hi there", "Hello!", "How are you?", "Fine."]
    for system, kwargs in [
        ("You are a helpful assistant.", {}),
        ("Be brief.", {"system_prompt": "Be brief."}),
    ]:
        sample = _encode(tokenizer, roles, contents, **kwargs)
        _, first = make_context(tokenizer, "Hi there", system=system)
        assert sample.input_ids[: len(first)] == first
        assert all(label == IGNORE_INDEX for label in sample.labels[: len(first)])
        _, second = make_context(
            tokenizer, "How are you?", history=[("Hi there", "Hello!")], system=system
        )
        assert sample.input_ids[: len(second)] == second


def test_record_system_turn_replaces_default(tokenizer):
    from qwen.chat_format import make_context

    sample = _encode(
        tokenizer, ["system", "user", "assistant"], ["You judge art.", "Nice?", "Yes."]
    )
    _, context = make_context(tokenizer, "Nice?", system="You judge art.")
    assert sample.input_ids[: len(context)] == context


def test_image_markers_expand_to_placeholder_runs(tokenizer):
    contents = ["<image>\nCompare with <image> please. <|extra_0|> <|im_start|>", "Same."]
    sample = _encode(tokenizer, ["user", "assistant"], contents)
    assert sample.input_ids.count(IMAGE_ID) == 2 * N  # literal "<|extra_0|>" text stays text
    assert sample.input_ids.count(tokenizer.im_start_id) == 3  # system, user, assistant only
    last_run_start = max(i for i, t in enumerate(sample.input_ids) if t == IMAGE_ID) - N + 1
    assert sample.input_ids[last_run_start : last_run_start + N] == [IMAGE_ID] * N
    assert sample.image_end == last_run_start + N


def test_text_only_sample_has_no_placeholders(tokenizer):
    sample = _encode(tokenizer, ["user", "assistant"], ["Hello", "Hi"])
    assert IMAGE_ID not in sample.input_ids
    assert sample.image_end == 0


def test_no_assistant_turn_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        _encode(tokenizer, ["user"], ["Hello"])


def test_truncation_keeps_when_cut_is_after_the_images(tokenizer):
    sample = _encode(tokenizer, ["user", "assistant"], ["<image>\nDescribe.", "word " * 50])
    cut = sample.first_label + 3
    kept = fit_to_length(sample, cut)
    assert kept is not None
    assert len(kept.input_ids) == len(kept.labels) == cut
    assert kept.input_ids.count(IMAGE_ID) == N
    assert sum(label != IGNORE_INDEX for label in kept.labels) == 3
    assert fit_to_length(sample, len(sample.input_ids)) is sample  # fits: untouched


def test_truncation_drops_when_the_cut_would_split_an_image(tokenizer):
    sample = _encode(tokenizer, ["user", "assistant"], ["<image>\nDescribe.", "word " * 50])
    assert fit_to_length(sample, sample.image_end - 1) is None
    assert fit_to_length(sample, sample.image_end) is None  # image kept but no answer token
    assert fit_to_length(sample, sample.first_label) is None
    assert fit_to_length(sample, sample.first_label + 1) is not None


def test_truncation_drops_when_a_later_image_would_be_cut(tokenizer):
    roles = ["user", "assistant", "user", "assistant"]
    contents = ["Hi", "Hello " * 20, "<image>\nAnd this?", "A cat."]
    sample = _encode(tokenizer, roles, contents)
    assert sample.first_label < sample.image_end
    assert fit_to_length(sample, sample.image_end - 2) is None


class _TinyHFTokenizer:
    """Stands in for an HF tokenizer: records how it was called, maps characters to ids."""

    unk_token_id = 0

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [{"<|im_start|>": 1, "<|im_end|>": 2}.get(t, 0) for t in tokens]

    def __call__(self, text: str, **kwargs):
        self.calls.append(kwargs)

        class Out:
            input_ids = [100 + ord(c) for c in text]

        return Out()


def test_hf_tokenizers_encode_plain_text_and_use_the_same_layout():
    tok = _TinyHFTokenizer()
    assert encode_text(tok, "ab") == [197, 198]
    assert tok.calls[-1] == {"add_special_tokens": False, "split_special_tokens": True}
    sample = encode_conversation(
        tok,
        ["user", "assistant"],
        ["q", "a"],
        image_token_id=9,
        num_image_tokens=2,
        system_prompt="s",
    )
    nl = 100 + ord("\n")
    role = [100 + ord(c) for c in "assistant"]
    assert sample.input_ids[-(len(role) + 4) :] == [1, *role, nl, 100 + ord("a"), 2]
    assert _supervised_runs(sample.labels) == [[100 + ord("a"), 2]]


def test_prebuilt_blocks_give_the_same_ids(tokenizer):
    from dataset.conversation import ChatBlocks

    args = (["user", "assistant"], ["<image>\nQ?", "A."])
    blocks = ChatBlocks.build(tokenizer)
    assert blocks.roles["assistant"] == ([tokenizer.im_start_id, 77091, 198], [tokenizer.im_end_id])
    assert _encode(tokenizer, *args, blocks=blocks) == _encode(tokenizer, *args)
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        _encode(tokenizer, ["robot", "assistant"], ["x", "y"], blocks=blocks)


def test_encode_prompt_is_make_context_for_a_text_query():
    from dataset.conversation import encode_prompt
    from qwen import QWenTokenizer, make_context

    tokenizer = QWenTokenizer()
    ids = encode_prompt(
        tokenizer, ["user"], ["What is this?"], image_token_id=151646, num_image_tokens=4
    )
    assert ids == make_context(tokenizer, "What is this?")[1]
    with_image = encode_prompt(
        tokenizer, ["user"], ["<image>\nWhat?"], image_token_id=151646, num_image_tokens=4
    )
    assert with_image.count(151646) == 4
    assert with_image[-3:] == [tokenizer.im_start_id, 77091, 198]  # "<|im_start|>assistant\n"
