"""A model trained on top of another (`train.py --init_from DIR`): its parent, merged, and the
record of it in the child's `vlm_config.json` (`model.checkpoint.INIT_FROM`).

The parent's LoRA is merged into its LLM in memory (16/32-bit) and a fresh LoRA trains on top;
the merged weights are never written. So the child records its parent's path and content
fingerprint (`model.checkpoint.checkpoint_fingerprint`), and `load_vlm` rebuilds the parent
merged before it applies the child's weights; a parent that is gone or changed is refused.
"""

from __future__ import annotations

from pathlib import Path

from model.checkpoint import (
    INIT_FROM,
    VLM_CONFIG,
    CheckpointError,
    checkpoint_fingerprint,
    load_vlm,
)


def load_parent(checkpoint: Path, description: dict, dtype, bits, allow_other_base, overrides):
    """(vlm, tokenizer) of the model `checkpoint` was trained on top of: its parent, merged."""
    parent = Path(description[INIT_FROM]["path"])
    if bits == 4:
        raise CheckpointError(
            f"{checkpoint}: trained on top of {parent} (--init_from), whose LoRA is merged in "
            "16/32-bit; load it with --bits 16, or merge it (python -m runtime.merge) first"
        )
    if not (parent / VLM_CONFIG).is_file():
        raise CheckpointError(f"{checkpoint}: trained on top of {parent}, which is gone")
    if (
        not allow_other_base
        and checkpoint_fingerprint(parent) != description[INIT_FROM]["fingerprint"]
    ):
        raise CheckpointError(
            f"{checkpoint}: trained on top of {parent}, whose weights have changed since "
            "(pass --allow_other_base to load it anyway)"
        )
    vlm, tokenizer, _ = load_merged(
        parent, dtype=dtype, allow_other_base=allow_other_base, **overrides
    )
    return vlm, tokenizer


def load_merged(checkpoint: str | Path, **load_kwargs):
    """`load_vlm` in 16/32-bit with the LoRA adapter merged into the LLM: the starting model of
    `train.py --init_from` (and of what it trains). Returns (vlm, tokenizer, description)."""
    from peft import PeftModel

    vlm, tokenizer, description = load_vlm(checkpoint, **{**load_kwargs, "bits": 16})
    if isinstance(vlm.llm, PeftModel):
        vlm.llm = vlm.llm.merge_and_unload()
    return vlm, tokenizer, description


def parent_record(checkpoint: str | Path) -> dict:
    """What a child's `vlm_config.json` records of its `--init_from` parent."""
    path = Path(checkpoint).resolve()
    return {"path": str(path), "fingerprint": checkpoint_fingerprint(path)}
