"""The LLM as a llama.cpp text GGUF: `qwen2` hyperparameters, tensor names and the tokenizer.

The native Qwen-7B becomes llama.cpp's `qwen2` architecture through the same QWen -> Qwen2 mapping
as the LLaVA export (`runtime.export.llava.qwen2_state_dict`); a transformers Qwen2 LLM keeps its
own weights. The names and keys are llama.cpp's (gguf-py `constants.py`, MODEL_ARCH.QWEN2 and
`src/llama-vocab.cpp`; docs/GGUF.md lists them):

- `token_embd`, `output_norm`, `output` (the untied lm_head), and per block `attn_norm`,
  `attn_q|k|v` (weight and bias), `attn_output`, `ffn_norm`, `ffn_gate` (QWen's w2, the SiLU
  gate), `ffn_up` (w1), `ffn_down` (c_proj);
- the BPE vocabulary as `tokenizer.ggml.model = "gpt2"` with byte-level token strings and merges,
  `tokenizer.ggml.pre = "qwen2"` (llama.cpp's pre-split regex for it is Qwen-1's `PAT_STR`, digits
  one per token); control tokens typed CONTROL, rows past the vocabulary `[PAD{i}]` typed UNUSED.
"""

from __future__ import annotations

import json

import gguf
import torch
from torch import nn

from qwen import QWenLMHeadModel
from qwen.tokenization_qwen import ENDOFTEXT, IM_END
from runtime.export.llava import qwen2_config, qwen2_state_dict

ARCH = "qwen2"
# our Qwen2 state-dict names (relative to the text model) -> llama.cpp's, per block
BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}


def check_text_model(llm: nn.Module) -> None:
    """Raise ValueError naming what llama.cpp's qwen2 cannot hold."""
    if isinstance(llm, QWenLMHeadModel):
        config = llm.config
        if not config.no_bias or config.rotary_pct != 1.0:
            raise ValueError(
                f"llama.cpp's qwen2 cannot hold this QWen: no_bias={config.no_bias}, rotary_pct="
                f"{config.rotary_pct} (qwen2 has no MLP / o_proj biases and rotates the whole head)"
            )
        return
    model_type = getattr(getattr(llm, "config", None), "model_type", None)
    if model_type != "qwen2":
        raise ValueError(
            f"the GGUF export maps the LLM to llama.cpp's qwen2 architecture; it holds Qwen-7B "
            f"(QWenLMHeadModel) and transformers Qwen2 models, got model_type {model_type!r}. "
            "Export to a transformers LLaVA (--format hf) and use llama.cpp's "
            "convert_hf_to_gguf.py for other architectures"
        )


def text_hparams(llm: nn.Module) -> dict:
    """The qwen2 hyperparameters of `llm` (a QWen is read through its Qwen2 rewrite)."""
    config = qwen2_config(llm.config) if isinstance(llm, QWenLMHeadModel) else llm.config
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": config.num_attention_heads,
        "head_count_kv": config.num_key_value_heads,
        "rope_freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        "rms_eps": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
    }


def text_tensors(llm: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `llm` under llama.cpp's qwen2 names, in file order."""
    native = isinstance(llm, QWenLMHeadModel)
    source = qwen2_state_dict(llm) if native else llm.model.state_dict()
    state = {TOP_NAMES["embed_tokens.weight"]: source["embed_tokens.weight"]}
    for i in range(text_hparams(llm)["block_count"]):
        for ours, theirs in BLOCK_NAMES.items():
            state[f"blk.{i}.{theirs}"] = source[f"layers.{i}.{ours}"]
    state[TOP_NAMES["norm.weight"]] = source["norm.weight"]
    state["output.weight"] = llm.get_output_embeddings().weight
    return state


def vocabulary(tokenizer_json: str, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b") from a byte-level BPE tokenizer.json.

    Ids without a token up to `vocab_size` (the embedding rows past the vocabulary) become
    `[PAD{id}]` of type UNUSED, as llama.cpp's own converter writes them.
    """
    spec = json.loads(tokenizer_json)
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"the tokenizer is {spec['model']['type']}, llama.cpp's gpt2 needs BPE")
    by_id: dict[int, tuple[str, int]] = {
        i: (token, gguf.TokenType.NORMAL) for token, i in spec["model"]["vocab"].items()
    }
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise ValueError(f"token id {max(by_id)} is past the model's {vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):
        token, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def add_tokenizer(writer: gguf.GGUFWriter, fast_tokenizer, vocab_size: int, template: str):
    """Vocabulary, merges, special ids and the chat template into `writer`."""
    tokens, types, merges = vocabulary(fast_tokenizer.backend_tokenizer.to_str(), vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    endoftext = fast_tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    writer.add_bos_token_id(endoftext)  # never added (add_bos_token false), as Qwen2's own GGUFs
    writer.add_eos_token_id(fast_tokenizer.convert_tokens_to_ids(IM_END))
    writer.add_pad_token_id(endoftext)
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)


def add_text_hparams(writer: gguf.GGUFWriter, hparams: dict) -> None:
    writer.add_context_length(hparams["context_length"])
    writer.add_embedding_length(hparams["embedding_length"])
    writer.add_block_count(hparams["block_count"])
    writer.add_feed_forward_length(hparams["feed_forward_length"])
    writer.add_head_count(hparams["head_count"])
    writer.add_head_count_kv(hparams["head_count_kv"])
    writer.add_rope_freq_base(hparams["rope_freq_base"])
    writer.add_layer_norm_rms_eps(hparams["rms_eps"])
