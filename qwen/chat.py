"""Text-only chat with a Qwen-7B(-Chat) checkpoint directory, no remote code needed.

    python -m qwen.chat --model /models/Qwen-7B-Chat [--system "..."] [--max_new_tokens 512]

Each line on stdin is one user turn; the reply is printed, and the conversation is kept as
history in the original ChatML layout (`make_context`), stopping at `<|im_end|>`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from qwen.chat_format import DEFAULT_SYSTEM_PROMPT, chat_stop_ids, make_context
from qwen.modeling_qwen import QWenLMHeadModel
from qwen.tokenization_qwen import QWenTokenizer


@torch.no_grad()
def reply(model, tokenizer, query: str, history: list[tuple[str, str]], system: str, **generate):
    """One assistant reply to `query` given earlier (query, reply) pairs."""
    _, ids = make_context(tokenizer, query, history=history, system=system)
    input_ids = torch.tensor([ids], device=model.device)  # [1, T]
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        eos_token_id=chat_stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **generate,
    )
    return tokenizer.decode(output[0, len(ids) :].tolist(), skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Chat with a Qwen-7B(-Chat) directory.")
    parser.add_argument("--model", required=True, help="local checkpoint directory or hub id")
    parser.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--do_sample", action="store_true", help="sample (top_p 0.8) not greedy")
    args = parser.parse_args(argv)
    use_gpu = torch.cuda.is_available()
    tokenizer = QWenTokenizer.from_pretrained(args.model)
    model = QWenLMHeadModel.from_pretrained(
        args.model,
        dtype=torch.bfloat16 if use_gpu else torch.float32,
        device_map="cuda" if use_gpu else None,
    ).eval()
    sampling = {"do_sample": True, "top_p": 0.8, "top_k": 0} if args.do_sample else {}
    history: list[tuple[str, str]] = []
    for line in sys.stdin:
        query = line.rstrip("\n")
        if not query:
            continue
        answer = reply(
            model, tokenizer, query, history, args.system,
            max_new_tokens=args.max_new_tokens, **sampling,
        )  # fmt: skip
        history.append((query, answer))
        print(answer, flush=True)


if __name__ == "__main__":
    main()
