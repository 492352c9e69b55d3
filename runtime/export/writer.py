"""Write a trained checkpoint as a standalone transformers `LlavaForConditionalGeneration` directory,
or `LlavaNextForConditionalGeneration` for an anyres one (`runtime/export/llava_next.py`).

What can be checked is checked before anything is written: the destination, the checkpoint's
description (towers and projectors LLaVA cannot hold), its files (`model.checkpoint.load_vlm`
names a missing or damaged one) and the converted model. The directory is built in a hidden
sibling and renamed into place (`runtime.outputs.atomic_directory`), so OUT_DIR is absent, the
old one, or the whole new one. The same checkpoint always gives byte-identical safetensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import GenerationConfig, LlavaForConditionalGeneration

from dataset.conversation import chat_stop_token_ids
from model.anyres import AnyResProjector
from model.checkpoint import checkpoint_sources, load_vlm, read_description, readable_weights
from model.config import DTYPES
from qwen import QWenLMHeadModel
from qwen.chat_format import DEFAULT_SYSTEM_PROMPT
from runtime.export.llava import (
    llava_config,
    llava_state_dict,
    qwen_extrapolation_note,
    saved_layout,
)
from runtime.export.llava_next import write_llava_next
from runtime.export.processor import llava_processor
from runtime.export.tokenizer import export_tokenizer
from runtime.outputs import atomic_directory, check_destination, check_not_a_source

logger = logging.getLogger(__name__)

EXPORT_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_SHARD_SIZE = "5GB"
NOTES_KEY = "export_notes"  # top-level key of the exported config.json


def check_description(description: dict, checkpoint: Path) -> None:
    """Refuse, before any weight loads, what LLaVA cannot hold; say what to use instead."""
    library = description["vision"].get("vision_library", "transformers")
    if library != "transformers":
        raise ValueError(
            f"{checkpoint}: its vision tower comes from {library!r}; transformers' LLaVA (and "
            "vLLM, SGLang) hold only transformers CLIP or SigLIP vision models. Retrain the "
            "projector on a transformers checkpoint of the tower (e.g. "
            "openai/clip-vit-large-patch14-336, google/siglip-so400m-patch14-384), or serve this "
            "checkpoint with test.py / runtime.inference (`python -m runtime.merge` makes it "
            "standalone for this toolkit)"
        )
    kind = description["projector"].get("projector_type", "mlp2x_gelu")
    if kind != "mlp2x_gelu":
        raise ValueError(
            f"{checkpoint}: its projector is {kind!r}; LLaVA's multi_modal_projector is the "
            "2-layer GELU MLP (projector_type mlp2x_gelu) and has no cross-attention resampler. "
            "Train with --projector_type mlp2x_gelu to export, or serve this checkpoint with "
            "test.py / runtime.inference (`python -m runtime.merge` makes it standalone for this "
            "toolkit)"
        )


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    **load_kwargs,
) -> Path:
    """Export a training output, checkpoint-N or merged directory to `out_dir`; returns it.

    LoRA is merged (peft `merge_and_unload`); weights are written in `dtype` as safetensors
    shards with an index. `load_kwargs` go to `load_vlm` (language_model, vision_model,
    allow_other_base).
    """
    from peft import PeftModel  # imported where used: it imports bitsandbytes

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    checkpoint = Path(checkpoint)
    check_destination(out_dir, overwrite=overwrite, flag="OUT_DIR")
    overrides = {k: load_kwargs.get(k) for k in ("language_model", "vision_model")}
    check_not_a_source(out_dir, checkpoint_sources(checkpoint, **overrides), flag="OUT_DIR")
    check_description(read_description(checkpoint), checkpoint)
    vlm, tokenizer, description = load_vlm(
        checkpoint, **{**load_kwargs, "dtype": dtype, "bits": 16}
    )
    if isinstance(vlm.llm, PeftModel):
        vlm.llm = vlm.llm.merge_and_unload()
    system_prompt = description.get("system_prompt") or DEFAULT_SYSTEM_PROMPT
    if isinstance(vlm.projector, AnyResProjector):  # size-dependent tokens: LLaVA-NeXT
        notes = export_notes(vlm)
        write_llava_next(vlm, tokenizer, out_dir, system_prompt=system_prompt, dtype=dtype,
                         overwrite=overwrite, max_shard_size=max_shard_size,
                         notes={NOTES_KEY: notes})  # fmt: skip
        _log_done(checkpoint, out_dir, dtype, notes)
        return Path(out_dir)
    config = llava_config(vlm)  # raises for anything else LLaVA cannot hold
    image_token = tokenizer.convert_ids_to_tokens(vlm.image_token_id)
    exported_tokenizer = export_tokenizer(tokenizer)
    processor = llava_processor(vlm, exported_tokenizer, image_token, system_prompt)
    exported_tokenizer.chat_template = processor.chat_template  # servers may read either
    notes = export_notes(vlm)
    setattr(config, NOTES_KEY, notes)
    model = _llava_with_weights(vlm, config, DTYPES[dtype])
    model.generation_config = GenerationConfig(
        eos_token_id=chat_stop_token_ids(tokenizer),
        pad_token_id=exported_tokenizer.pad_token_id,
        do_sample=False,
    )
    with atomic_directory(out_dir, overwrite=overwrite, flag="OUT_DIR") as staging:
        state = saved_layout(model.state_dict())
        model.save_pretrained(staging, state_dict=state, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        readable_weights(staging)
        (staging / "README.md").write_text(readme(checkpoint, dtype, notes), encoding="utf-8")
    _log_done(checkpoint, out_dir, dtype, notes)
    return Path(out_dir)


def _log_done(checkpoint: Path, out_dir, dtype: str, notes: list[str]) -> None:
    for note in notes:
        logger.warning("export note: %s", note)
    logger.info("exported %s to %s (%s)", checkpoint, out_dir, dtype)


def export_notes(vlm) -> list[str]:
    """What the exported model does not reproduce exactly (written into config.json and README)."""
    if isinstance(vlm.llm, QWenLMHeadModel):
        return [qwen_extrapolation_note(vlm.llm.config)]
    return []


@torch.no_grad()
def _llava_with_weights(vlm, config, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """A LLaVA whose parameters are `vlm`'s tensors in `dtype` (shared where no cast is needed):
    built on the meta device, so no second copy of a 7B model is allocated and initialised."""
    state = {name: tensor.to(dtype) for name, tensor in llava_state_dict(vlm).items()}
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def readme(checkpoint: Path, dtype: str, notes: list[str]) -> str:
    """README.md of the exported directory: where it came from, how to load it, the notes."""
    lines = [
        "# LLaVA export",
        "",
        f"Exported by `python -m runtime.export` from `{checkpoint.resolve()}` ({dtype}).",
        "It loads with transformers alone:",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        'processor = AutoProcessor.from_pretrained(path, backend="pil")  # pixel-exact resizing',
        "model = LlavaForConditionalGeneration.from_pretrained(path)",
        "```",
    ]
    if notes:
        lines += ["", "## Differences from the training-time model", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
