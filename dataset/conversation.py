"""One conversation -> `input_ids` and `labels`: this file owns which tokens carry loss.

Layout: ChatML exactly as `qwen.chat_format.make_context` builds it (the role blocks come from
`qwen.chat_format.role_block_ids`, so the layout lives in one place):

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{q_1}<|im_end|>\\n<|im_start|>assistant\\n{a_1}<|im_end|>\\n ...
    <|im_start|>user\\n{q_k}<|im_end|>\\n<|im_start|>assistant\\n{a_k}<|im_end|>

Turns are joined by one "\\n"; the sequence ends with the last assistant's <|im_end|> (no trailing
"\\n": it would be an unsupervised token that the model never has to produce). Every prefix that
ends after a user turn + "\\n<|im_start|>assistant\\n" is token-for-token the generation prompt
of `make_context` for the same system prompt, history and query.

Labels are aligned with `input_ids` (not shifted; only the LLM shifts). They are -100 everywhere
except the assistant content tokens and the assistant's <|im_end|>. The role header
"<|im_start|>assistant\\n" and the "\\n" between turns are not supervised. This differs on purpose
from Qwen's `finetune.py`, which also supervises <|im_start|>/<|im_end|> of system and user turns
and the "\\n" after each turn: we supervise only what the model must generate at inference
(the answer, then <|im_end|> to stop).

Each "<image>" marker in a system or user turn becomes a run of `image_token_id`, inserted as
ids: `num_image_tokens` copies, or, given one count per image (a processor whose counts depend
on the image size, see `dataset.processor`), that image's count. The text around markers is encoded as plain text, so
special-token text in the data ("<|im_start|>", "<|extra_0|>") stays ordinary text.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from dataprocess.schema import IMAGE_MARKER
from qwen.chat_format import DEFAULT_SYSTEM_PROMPT, chat_stop_ids, role_block_ids
from qwen.tokenization_qwen import QWenTokenizer

IGNORE_INDEX = -100


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as plain text: special-token text is never parsed into control ids."""
    if isinstance(tokenizer, QWenTokenizer):
        return tokenizer.encode_ids(text)
    # HF tokenizers (e.g. Qwen2's) parse "<|im_start|>" unless told to split special tokens.
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


class _ChatMLAdapter:
    """Gives an HF tokenizer with <|im_start|>/<|im_end|> the attributes `role_block_ids` reads."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        unknown = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or i == unknown for i in ids):
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no <|im_start|>/<|im_end|> tokens; "
                "the ChatML layout needs both"
            )
        self.im_start_id, self.im_end_id = ids

    def encode_ids(self, text: str) -> list[int]:
        return encode_text(self._tokenizer, text)


def chat_stop_token_ids(tokenizer: Any) -> list[int]:
    """generate()'s eos ids for the ChatML layout: Qwen-7B's [im_end, im_start, endoftext]
    (`qwen.chat_format.chat_stop_ids`), or an HF tokenizer's <|im_end|>, <|im_start|> and eos."""
    if isinstance(tokenizer, QWenTokenizer):
        return chat_stop_ids(tokenizer)
    chat = _ChatMLAdapter(tokenizer)
    eos = tokenizer.eos_token_id
    return list(
        dict.fromkeys([chat.im_end_id, chat.im_start_id, *([eos] if eos is not None else [])])
    )


def chatml_tokenizer(tokenizer: Any) -> Any:
    """`tokenizer` itself for QWenTokenizer, else an adapter usable with `qwen.chat_format`."""
    return tokenizer if isinstance(tokenizer, QWenTokenizer) else _ChatMLAdapter(tokenizer)


@dataclass(frozen=True)
class ChatBlocks:
    """The fixed ids of the layout (role headers/footers, the turn separator) for a tokenizer.

    Built once per batch by callers that render many conversations (encoding them per turn
    would double the tokenizer calls).
    """

    newline: list[int]
    roles: dict[str, tuple[list[int], list[int]]]  # role -> (prefix, suffix)

    @classmethod
    def build(cls, tokenizer: Any) -> ChatBlocks:
        chat = chatml_tokenizer(tokenizer)
        roles = {role: role_block_ids(chat, role) for role in ("system", "user", "assistant")}
        return cls(newline=encode_text(tokenizer, "\n"), roles=roles)


@dataclass(frozen=True)
class EncodedConversation:
    """A rendered conversation plus the offsets the truncation rule needs."""

    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE_INDEX where no loss
    image_end: int  # index just after the last image placeholder; 0 without images
    first_label: int  # index of the first supervised token (always exists)


def _expand_images(
    tokenizer: Any, text: str, image_token_id: int, counts: Iterator[int]
) -> tuple[list[int], int]:
    """Encode `text` with each marker replaced by a run of placeholder ids, the next count each.

    Returns (ids, end of the last placeholder run within ids, or 0).
    """
    pieces = text.split(IMAGE_MARKER)
    ids = encode_text(tokenizer, pieces[0])
    image_end = 0
    for piece in pieces[1:]:
        count = next(counts, None)
        if count is None:
            raise ValueError("the turns hold more <image> markers than image token counts")
        ids += [image_token_id] * count
        image_end = len(ids)
        ids += encode_text(tokenizer, piece)
    return ids, image_end


def _image_counts(num_image_tokens: int | Sequence[int]) -> Iterator[int]:
    """One count per image, in marker order: an int is every image's count."""
    if isinstance(num_image_tokens, int):
        return itertools.repeat(num_image_tokens)
    return iter(list(num_image_tokens))


def encode_conversation(
    tokenizer: Any,
    roles: Sequence[str],
    contents: Sequence[str],
    *,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    blocks: ChatBlocks | None = None,
) -> EncodedConversation:
    """Render turns (optional leading system, then user/assistant) as ChatML ids + labels.

    `num_image_tokens` is every image's placeholder count, or one count per `<image>` marker in
    order (then exactly as many as markers). `system_prompt` is used when the record has no
    system turn; `blocks` may be passed to reuse `ChatBlocks.build(tokenizer)`. Raises
    ValueError if the turns hold no assistant turn (nothing to learn from), a role other than
    system/user/assistant, or per-image counts that do not match the markers.
    """
    blocks = blocks or ChatBlocks.build(tokenizer)
    counts = _image_counts(num_image_tokens)
    newline = blocks.newline
    turns = list(zip(roles, contents, strict=True))
    if not turns or turns[0][0] != "system":
        turns.insert(0, ("system", system_prompt))
    input_ids: list[int] = []
    labels: list[int] = []
    image_end, first_label = 0, -1
    for position, (role, content) in enumerate(turns):
        if position:
            input_ids += newline
            labels += [IGNORE_INDEX] * len(newline)
        if role not in blocks.roles:
            raise ValueError(f"turn {position}: unknown role {role!r}")
        prefix, suffix = blocks.roles[role]
        if role == "assistant":
            body = encode_text(tokenizer, content) + suffix
            if first_label < 0:
                first_label = len(input_ids) + len(prefix)
            input_ids += prefix + body
            labels += [IGNORE_INDEX] * len(prefix) + body
            continue
        body, body_image_end = _expand_images(tokenizer, content, image_token_id, counts)
        if body_image_end:
            image_end = len(input_ids) + len(prefix) + body_image_end
        input_ids += prefix + body + suffix
        labels += [IGNORE_INDEX] * (len(prefix) + len(body) + len(suffix))
    if not isinstance(num_image_tokens, int) and next(counts, None) is not None:
        raise ValueError(
            f"{len(num_image_tokens)} image token counts for fewer <image> markers in the turns"
        )
    if first_label < 0:
        raise ValueError(f"conversation with roles {list(roles)} has no assistant turn")
    return EncodedConversation(input_ids, labels, image_end, first_label)


def encode_prompt(
    tokenizer: Any,
    roles: Sequence[str],
    contents: Sequence[str],
    *,
    image_token_id: int,
    num_image_tokens: int | Sequence[int],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    blocks: ChatBlocks | None = None,
) -> list[int]:
    """The generation prompt for turns ending with a user turn: the training layout up to and
    including "<|im_start|>assistant\\n", so inference sees exactly what training saw (and what a
    preference pair's answers follow). `blocks` as in `encode_conversation`."""
    if not roles or roles[-1] != "user":
        raise ValueError(f"a prompt must end with a user turn, got roles {list(roles)}")
    # Render the history plus an empty assistant turn, then drop that turn's <|im_end|>: one
    # layout, one code path, and every earlier turn kept (the prompt for turn k is the training
    # rendering of turns 1..k-1, user turn k and the assistant header).
    blocks = blocks or ChatBlocks.build(tokenizer)
    encoded = encode_conversation(
        tokenizer,
        [*roles, "assistant"],
        [*contents, ""],
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        system_prompt=system_prompt,
        blocks=blocks,
    )
    _, suffix = blocks.roles["assistant"]
    return encoded.input_ids[: len(encoded.input_ids) - len(suffix)]


def fit_to_length(sample: EncodedConversation, max_length: int) -> EncodedConversation | None:
    """Apply the truncation rule; returns the sample (cut if needed) or None to drop it.

    A sample longer than `max_length` is cut at `max_length` only if every image placeholder
    lies before the cut (never half an image, never an image without its features) and at
    least one supervised token remains; otherwise it is dropped. Callers count both outcomes.
    """
    if len(sample.input_ids) <= max_length:
        return sample
    if sample.image_end > max_length or sample.first_label >= max_length:
        return None
    return EncodedConversation(
        sample.input_ids[:max_length],
        sample.labels[:max_length],
        sample.image_end,
        sample.first_label,
    )
