"""ChatML layout of Qwen-7B-Chat: the one place that knows how a conversation becomes tokens.

A turn is `<|im_start|>{role}\\n{content}<|im_end|>`; turns are joined by a single "\\n" and a
prompt ends right after `<|im_start|>assistant\\n`:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{q_1}<|im_end|>\\n<|im_start|>assistant\\n{r_1}<|im_end|>\\n   (per history turn)
    <|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n

Building blocks (use these instead of re-spelling the layout, e.g. to attach labels):
- `role_block_ids(tokenizer, role) -> (prefix_ids, suffix_ids)`: prefix = [im_start] + enc(role)
  + [\\n], suffix = [im_end]. A turn's ids are prefix + enc(content) + suffix.
- `newline_ids(tokenizer) -> [198]`: the separator between turns.
- `turn_ids(tokenizer, role, content)` / `turn_text(role, content)`: one whole turn.
- `make_context(...)`: the inference prompt, identical to the original `make_context`.
- `chat_stop_ids(tokenizer) -> [im_end, im_start, eod]`: eos ids for HF `generate`.

Role names and contents are encoded with control tokens NOT allowed (as in the original), so
"<|im_start|>" typed by a user stays text. Callers that need image placeholders insert the
placeholder ids themselves (see dataset/).
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenization_qwen import IM_END, IM_START, QWenTokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
CHAT_FORMATS = ("chatml", "raw")


def newline_ids(tokenizer: QWenTokenizer) -> list[int]:
    """Ids of the "\\n" that separates turns (and follows a role name)."""
    return tokenizer.encode_ids("\n")


def role_block_ids(tokenizer: QWenTokenizer, role: str) -> tuple[list[int], list[int]]:
    """(prefix, suffix) around a turn's content: [im_start] + enc(role) + [\\n], [im_end]."""
    prefix = [tokenizer.im_start_id] + tokenizer.encode_ids(role) + newline_ids(tokenizer)
    return prefix, [tokenizer.im_end_id]


def turn_ids(tokenizer: QWenTokenizer, role: str, content: str) -> list[int]:
    """Ids of one whole turn; `content` is encoded with control tokens not allowed."""
    prefix, suffix = role_block_ids(tokenizer, role)
    return prefix + tokenizer.encode_ids(content) + suffix


def turn_text(role: str, content: str) -> str:
    """Text of one whole turn, matching `turn_ids`."""
    return f"{IM_START}{role}\n{content}{IM_END}"


def make_context(
    tokenizer: QWenTokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = DEFAULT_SYSTEM_PROMPT,
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """Build the generation prompt: (raw_text, token_ids), laid out as in the module docstring.

    History turns are kept newest first while system + kept turns stay under `max_window_size`
    tokens; older turns are dropped. As in the original, the final query block is not counted.
    `chat_format="raw"` returns the query alone (control tokens not parsed).
    """
    if chat_format == "raw":
        return query, tokenizer.encode_ids(query)
    if chat_format != "chatml":
        raise ValueError(f"chat_format={chat_format!r}: expected one of {CHAT_FORMATS}")
    nl = newline_ids(tokenizer)
    system_ids = turn_ids(tokenizer, "system", system)
    kept_text, kept_ids = "", []
    for index, pair in enumerate(reversed(history or ())):
        if len(pair) != 2:
            raise ValueError(
                f"history[{-1 - index}]: expected a (query, response) pair, got {pair!r}"
            )
        past_query, past_response = pair
        candidate = (
            nl + turn_ids(tokenizer, "user", past_query) + nl
            + turn_ids(tokenizer, "assistant", past_response)
        )  # fmt: skip
        if len(system_ids) + len(candidate) + len(kept_ids) >= max_window_size:
            break
        kept_ids = candidate + kept_ids
        kept_text = (
            f"\n{turn_text('user', past_query)}\n{turn_text('assistant', past_response)}"
            + kept_text
        )
    assistant_prefix, _ = role_block_ids(tokenizer, "assistant")
    token_ids = (
        system_ids + kept_ids + nl + turn_ids(tokenizer, "user", query) + nl + assistant_prefix
    )
    raw_text = (
        turn_text("system", system) + kept_text
        + f"\n{turn_text('user', query)}\n{IM_START}assistant\n"
    )  # fmt: skip
    return raw_text, token_ids


def chat_stop_ids(tokenizer: QWenTokenizer) -> list[int]:
    """eos ids for HF `generate` on ChatML: [im_end, im_start, eod] = [151645, 151644, 151643].

    The original stops on <|im_end|> or <|im_start|> (stop words) and then forces
    <|endoftext|>; listing all three as eos ids gives the same stopping points natively.
    """
    return [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
