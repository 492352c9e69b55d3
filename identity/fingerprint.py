"""Content fingerprints, the one place where "the same model / tower / data" is decided.

A path says where something is, not what it is: a model retrained in place, a tower with new
weights at the same path or an edited data file would pass as the old one. So checkpoints, resumes,
evaluation runs and the feature cache compare these fingerprints instead:

- `module_fingerprint(module)`: every parameter's shape and a strided sample of its values (at
  most `TENSOR_SAMPLES` per tensor, rounded to bf16 so fp32 / bf16 loads of the same weights
  agree). A change to any layer changes it (a merged LoRA moves every value of its layers). LoRA
  and `modules_to_save` copies are left out: they are what trains, not the base. Two digests:
  `all` tensors, and `plain` - the tensors outside linear layers (embeddings, norms), the only
  ones a 4-bit load still holds in floating point. A 4-bit load is compared on `plain` alone; a
  ZeRO-3 shard (parameters partitioned across processes) cannot be compared here.
- `path_fingerprint(path)`: a file's bytes (so the record order too), or a directory's relative
  file names and bytes. Large files (weights) can be sampled: size plus evenly spaced blocks.

Fingerprints are short hex strings; the module dict says how it was made (`version`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

VERSION = 2
TENSOR_SAMPLES = 1 << 14  # values hashed per tensor
_DIGEST_CHARS = 16
_CHUNK = 1 << 20
_SAMPLE_BLOCKS, _SAMPLE_BLOCK = 256, 1 << 16  # a sampled file: 256 blocks of 64 KiB
_NOT_BASE = ("lora_", ".modules_to_save.")  # what LoRA training adds next to the base weights


def _hexdigest(digest) -> str:
    return digest.hexdigest()[:_DIGEST_CHARS]


def _tensor_bytes(tensor) -> bytes:
    """Shape and a strided sample of `tensor`'s values as bf16 bytes."""
    import torch

    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // TENSOR_SAMPLES)
    values = flat[::stride][:TENSOR_SAMPLES].to("cpu", torch.bfloat16)
    return str(tuple(tensor.shape)).encode() + values.view(torch.int16).numpy().tobytes()


def _linear_parameter_names(module) -> set[str]:
    from torch import nn

    return {
        f"{name}.{own}" if name else own
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear)
        for own, _ in sub.named_parameters(recurse=False)
    }


def module_fingerprint(module) -> dict:
    """`{"version", "all", "plain"}` of a frozen base (LLM or vision tower); `all` is None where a
    4-bit load keeps linear weights packed."""
    linear = _linear_parameter_names(module)
    every, plain, complete = hashlib.blake2b(), hashlib.blake2b(), True
    for name, param in module.named_parameters():
        if any(part in name for part in _NOT_BASE):
            continue
        if hasattr(param, "ds_numel"):  # a ZeRO-3 shard: this process holds no whole tensor
            return {"version": VERSION, "all": None, "plain": None}
        if not param.is_floating_point():  # 4-bit packed: its values are not the weights'
            complete = False
            continue
        data = _tensor_bytes(param)
        every.update(data)
        if name not in linear:
            plain.update(data)
    return {
        "version": VERSION,
        "all": _hexdigest(every) if complete else None,
        "plain": _hexdigest(plain),
    }


def fingerprints_differ(recorded: dict, current: dict) -> bool:
    """Compare two `module_fingerprint`s on everything both hold (`all`, else `plain`; nothing
    for a ZeRO-3 shard, which holds neither)."""
    if recorded.get("plain") is None or current.get("plain") is None:
        return False
    if recorded.get("all") and current.get("all"):
        return recorded["all"] != current["all"]
    return recorded.get("plain") != current.get("plain")


def _file_digest(path: Path, digest, sample_over: int | None) -> None:
    size = path.stat().st_size
    digest.update(str(size).encode() + b"\0")
    with path.open("rb") as file:
        if sample_over is None or size <= sample_over:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
            return
        step = (size - _SAMPLE_BLOCK) // (_SAMPLE_BLOCKS - 1)
        for block in range(_SAMPLE_BLOCKS):
            file.seek(block * step)
            digest.update(file.read(_SAMPLE_BLOCK))


def path_fingerprint(path: str | os.PathLike, *, sample_over: int | None = None) -> str:
    """A file's content hash, or a directory's (relative names and contents of all its files, in
    sorted order). Files over `sample_over` bytes are sampled (size + evenly spaced blocks): for
    weights, where any retraining changes every block; data files are hashed whole (None)."""
    path = Path(path)
    digest = hashlib.blake2b()
    if path.is_file():
        _file_digest(path, digest, sample_over)
        return _hexdigest(digest)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        _file_digest(file, digest, sample_over)
    return _hexdigest(digest)
