"""Write a trained checkpoint as llama.cpp GGUF files: `model.gguf` (the LLM, architecture qwen2,
with the tokenizer and chat template), `mmproj.gguf` (the tower and projector, architecture clip)
and an Ollama `Modelfile` beside them.

The same guarantees as the transformers export (`runtime.export.writer`): what llama.cpp cannot
run (open_clip or Qwen-VL towers, the resampler, an LLM other than Qwen) is refused before any
weight loads or anything is written; a non-empty OUT_DIR is refused without --overwrite; the
files are written in a hidden sibling directory renamed into place; the same checkpoint gives
byte-identical files (no timestamps, fixed key and tensor order).
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import torch

from model.checkpoint import checkpoint_sources, load_vlm, read_description
from qwen.chat_format import DEFAULT_SYSTEM_PROMPT
from runtime.export.gguf_mmproj import add_mmproj_hparams, check_vision, mmproj_tensors
from runtime.export.gguf_text import (
    add_text_hparams,
    add_tokenizer,
    check_text_model,
    text_hparams,
    text_tensors,
)
from runtime.export.llava import tokens_per_image
from runtime.export.tokenizer import chat_template, export_tokenizer
from runtime.outputs import atomic_directory, check_destination, check_not_a_source

logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
TEXT_FILE, MMPROJ_FILE, MODELFILE = "model.gguf", "mmproj.gguf", "Modelfile"
# keys of ours (not read by llama.cpp): the placeholder our prompts carry for each image
IMAGE_TOKEN_KEY, IMAGE_TOKEN_ID_KEY = "vlm.image_token", "vlm.image_token_id"
NUM_IMAGE_TOKENS_KEY = "vlm.num_image_tokens"


def check_gguf_description(description: dict, checkpoint: Path) -> None:
    """Refuse, before any weight loads, towers and projectors llama.cpp's mmproj cannot run."""
    if description["vision"].get("image_aspect_ratio") == "anyres":
        raise ValueError(
            f"{checkpoint}: an anyres model has a size-dependent number of tokens per image, "
            "which this GGUF export (one fixed grid per image) cannot hold; export it with "
            "--format hf (LlavaNextForConditionalGeneration)"
        )
    library = description["vision"].get("vision_library", "transformers")
    if library != "transformers":
        raise ValueError(
            f"{checkpoint}: its vision tower comes from {library!r}; llama.cpp's LLaVA-style "
            "mmproj runs only transformers CLIP or SigLIP towers (no open_clip or Qwen-VL mapping "
            "exists). Retrain the projector on a transformers checkpoint of the tower, or serve "
            "this checkpoint with test.py / runtime.inference"
        )
    kind = description["projector"].get("projector_type", "mlp2x_gelu")
    if kind != "mlp2x_gelu":
        raise ValueError(
            f"{checkpoint}: its projector is {kind!r}; llama.cpp's LLaVA projector "
            "(clip.projector_type mlp) is the 2-layer GELU MLP (projector_type mlp2x_gelu), it "
            "has no cross-attention resampler. Train with --projector_type mlp2x_gelu to export"
        )


def export_gguf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    outtype: str = "f16",
    overwrite: bool = False,
    **load_kwargs,
) -> Path:
    """Export a training output, checkpoint-N or merged directory as GGUF files into `out_dir`."""
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    checkpoint = Path(checkpoint)
    check_destination(out_dir, overwrite=overwrite, flag="OUT_DIR")
    overrides = {k: load_kwargs.get(k) for k in ("language_model", "vision_model")}
    check_not_a_source(out_dir, checkpoint_sources(checkpoint, **overrides), flag="OUT_DIR")
    check_gguf_description(read_description(checkpoint), checkpoint)
    vlm, tokenizer, description = load_vlm(
        checkpoint, **{**load_kwargs, "dtype": "float32", "bits": 16}
    )
    from peft import PeftModel  # imported where used: it imports bitsandbytes (runtime/cli.py)

    if isinstance(vlm.llm, PeftModel):
        vlm.llm = vlm.llm.merge_and_unload()
    check_text_model(vlm.llm)
    check_vision(vlm)
    system_prompt = description.get("system_prompt") or DEFAULT_SYSTEM_PROMPT
    image_token = tokenizer.convert_ids_to_tokens(vlm.image_token_id)
    with atomic_directory(out_dir, overwrite=overwrite, flag="OUT_DIR") as staging:
        write_text_gguf(staging / TEXT_FILE, vlm, tokenizer, outtype, system_prompt, image_token)
        write_mmproj_gguf(staging / MMPROJ_FILE, vlm, outtype)
        (staging / MODELFILE).write_text(modelfile(system_prompt), encoding="utf-8")
    logger.info("exported %s to %s (GGUF, %s)", checkpoint, out_dir, outtype)
    return Path(out_dir)


@torch.no_grad()
def write_text_gguf(path: Path, vlm, tokenizer, outtype: str, system_prompt: str, image_token):
    """The LLM, its tokenizer, chat template and placeholder as a qwen2 GGUF at `path`."""
    hparams = text_hparams(vlm.llm)
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_file_type(FILE_TYPES[outtype])
    add_text_hparams(writer, hparams)
    template = chat_template(image_token, system_prompt)
    add_tokenizer(writer, export_tokenizer(tokenizer), hparams["vocab_size"], template)
    writer.add_string(IMAGE_TOKEN_KEY, image_token)
    writer.add_uint32(IMAGE_TOKEN_ID_KEY, vlm.image_token_id)
    writer.add_uint32(NUM_IMAGE_TOKENS_KEY, tokens_per_image(vlm))
    _write(writer, text_tensors(vlm.llm), outtype)


@torch.no_grad()
def write_mmproj_gguf(path: Path, vlm, outtype: str) -> None:
    """The tower and projector as a clip GGUF at `path` (f16 weights for q8_0: see docs/GGUF.md)."""
    writer = gguf.GGUFWriter(path, "clip")
    vision_outtype = "f32" if outtype == "f32" else "f16"
    writer.add_file_type(FILE_TYPES[vision_outtype])
    add_mmproj_hparams(writer, vlm)
    _write(writer, mmproj_tensors(vlm), vision_outtype, keep_f32=("v.patch_embd", "v.position"))


def _write(writer: gguf.GGUFWriter, tensors: dict, outtype: str, keep_f32: tuple = ()) -> None:
    """Add `tensors` (names starting with `keep_f32` stay f32) and write the whole file."""
    for name, tensor in tensors.items():
        data, raw_dtype = encode(tensor, "f32" if name.startswith(keep_f32) else outtype)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def encode(tensor: torch.Tensor, outtype: str):
    """(array, raw dtype) of `tensor` in `outtype`: 1-D tensors (norms, biases) stay f32 as in
    llama.cpp's converter; q8_0 needs rows divisible by its block of 32, else f16."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if outtype == "f32" or data.ndim == 1:
        return data, None
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8_0][0] == 0:
        return gguf.quants.quantize(data, q8_0), q8_0
    return data.astype(np.float16), None


def modelfile(system_prompt: str) -> str:
    """An Ollama Modelfile for the two GGUFs: our ChatML layout, stop tokens, greedy decoding."""
    system = system_prompt.replace('"""', '\\"\\"\\"')
    return f'''FROM ./{TEXT_FILE}
FROM ./{MMPROJ_FILE}
TEMPLATE """{{{{ if .System }}}}<|im_start|>system
{{{{ .System }}}}<|im_end|>
{{{{ end }}}}{{{{ range .Messages }}}}<|im_start|>{{{{ .Role }}}}
{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}<|im_start|>assistant
"""
SYSTEM """{system}"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|im_start|>"
PARAMETER stop "<|endoftext|>"
PARAMETER temperature 0
'''
