"""`python -m qwen.chat`: text-only chat keeps history in the ChatML layout."""

from __future__ import annotations

import io

import torch

from qwen import QWenLMHeadModel, QWenTokenizer, make_context
from qwen.chat import main, reply


def test_reply_continues_the_make_context_prompt(tiny_qwen_dir):
    tokenizer = QWenTokenizer.from_pretrained(tiny_qwen_dir)
    model = QWenLMHeadModel.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    history = [("hi", "hello")]
    text = reply(model, tokenizer, "你好", history, "sys", max_new_tokens=3)
    _, ids = make_context(tokenizer, "你好", history=history, system="sys")
    expected = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                              eos_token_id=[151645, 151644, 151643], pad_token_id=151643)  # fmt: skip
    assert (
        text == tokenizer.decode(expected[0, len(ids) :].tolist(), skip_special_tokens=True).strip()
    )


def test_cli_answers_each_line(tiny_qwen_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\nsecond question\n"))
    main(["--model", str(tiny_qwen_dir), "--max_new_tokens", "2"])
    assert len(capsys.readouterr().out.splitlines()) == 2
