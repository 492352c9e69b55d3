"""The exported tokenizer and chat template: our ids and our ChatML layout, without this project.

Qwen-7B's `QWenTokenizer` is project code (tiktoken), so the export writes an equivalent fast
tokenizer: `tokenizer.json` built from the same `qwen.tiktoken` with Qwen-1's own pre-split regex
(`PAT_STR`: digits one per token), NFC normalisation as `QWenTokenizer.encode_ids` applies, and
the 208 control tokens registered at their ids. Unlike `QWenTokenizer`, a transformers tokenizer
parses control-token text in its input; that is how the chat template's `<|im_start|>` and the
image placeholder become single ids. Any other LLM's tokenizer is saved as it is.

The chat template renders `dataset.conversation.encode_prompt`'s layout: the system turn (the
checkpoint's recorded system prompt unless the conversation starts with its own), turns joined by
"\\n", and "<|im_start|>assistant\\n" as the generation prompt. An image item renders as the
placeholder token followed by "\\n" (test.py's "<image>\\n" before a prompt); the text "<image>"
in a string content becomes the placeholder too. `tests/test_export.py` checks the ids.

One difference remains: training encodes a role name, its "\\n" and the content separately, while
a tokenizer splits rendered text only at control tokens, so a content that starts with a newline
("\\nHello") merges it with the role's ("\\n\\n" is one token). Other contents give equal ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from dataprocess.schema import IMAGE_MARKER
from identity.fingerprint import path_fingerprint
from qwen.tokenization_qwen import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAT_STR,
    SPECIAL_TOKENS,
    QWenTokenizer,
)

# __IMAGE__, __SYSTEM__ and __MARKER__ are filled in as JSON string literals (Jinja reads the same
# escapes), so any system prompt is quoted safely.
CHAT_TEMPLATE = """\
{%- set image_token = __IMAGE__ -%}
{%- macro render(content) -%}
{%- if content is string -%}{{ content | replace(__MARKER__, image_token) }}
{%- else -%}{%- for item in content -%}
{%- if item['type'] in ('image', 'image_url') -%}{{ image_token + '\\n' }}
{%- elif item['type'] == 'text' -%}{{ item['text'] | replace(__MARKER__, image_token) }}
{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = render(messages[0]['content']) -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set system = __SYSTEM__ -%}{%- set turns = messages -%}{%- endif -%}
{{- '<|im_start|>system\\n' + system + '<|im_end|>' -}}
{%- for message in turns -%}
{{- '\\n<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def chat_template(image_token: str, system_prompt: str) -> str:
    """The Jinja chat template of our ChatML layout with this placeholder and default system."""
    template = CHAT_TEMPLATE
    for name, value in (("__IMAGE__", image_token), ("__SYSTEM__", system_prompt),
                        ("__MARKER__", IMAGE_MARKER)):  # fmt: skip
        template = template.replace(name, json.dumps(value, ensure_ascii=False))
    return template


_CONVERTED: dict[str, str] = {}  # content fingerprint of a qwen.tiktoken -> its tokenizer.json


def _qwen_tokenizer_json(vocab_file: str) -> str:
    """tokenizer.json text for a qwen.tiktoken; converting 151k ranks takes seconds, so the last
    one is kept, keyed by the file's content (every checkpoint holds its own copy of the same
    vocabulary, and a changed file at the same path must not reuse the old conversion)."""
    key = path_fingerprint(vocab_file)
    if key not in _CONVERTED:
        _CONVERTED.clear()
        _CONVERTED[key] = _convert_tiktoken(vocab_file)
    return _CONVERTED[key]


def _convert_tiktoken(vocab_file: str) -> str:
    tokenizer: Tokenizer = TikTokenConverter(vocab_file=vocab_file, pattern=PAT_STR).converted()
    tokenizer.normalizer = normalizers.NFC()  # QWenTokenizer.encode_ids normalises to NFC
    first = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, special=True) for token in SPECIAL_TOKENS]
    )
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != list(range(first, first + len(SPECIAL_TOKENS))):
        raise ValueError(f"{vocab_file}: the control tokens did not land at ids {first}...")
    return tokenizer.to_str()


def qwen_fast_tokenizer(tokenizer: QWenTokenizer) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer giving `tokenizer`'s ids (control-token text parsed)."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_qwen_tokenizer_json(str(Path(tokenizer.vocab_file)))),
        eos_token=IM_END,  # ends an assistant turn: what chat servers stop on
        pad_token=ENDOFTEXT,
        model_max_length=tokenizer.model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START, ENDOFTEXT]})
    return fast


def export_tokenizer(tokenizer):
    """The tokenizer to write: a fast equivalent for QWenTokenizer, any other one as it is."""
    if isinstance(tokenizer, QWenTokenizer):
        return qwen_fast_tokenizer(tokenizer)
    return tokenizer
