"""Checkpoint export: `python -m runtime.export CHECKPOINT OUT_DIR` writes a transformers
`LlavaForConditionalGeneration` directory (weights, config, processor, chat template, generation
config) that transformers, vLLM, SGLang and lmms-eval load without this project.

- `llava.py`: the model conversion (config and weight names; QWen -> Qwen2), also used by bench/;
- `tokenizer.py`: the fast tokenizer for Qwen-7B and the ChatML chat template;
- `processor.py`: the `LlavaProcessor` with the tower's image preprocessing;
- `writer.py`: `export_checkpoint`, the checks and the atomic write.

`--format gguf` writes llama.cpp files instead (docs/GGUF.md): `gguf_export.py` (`export_gguf`,
checks, dtypes, Modelfile), `gguf_text.py` (the LLM as qwen2 + tokenizer), `gguf_mmproj.py` (tower
and projector as a clip mmproj); `llama_cpp_runner.py` runs them in llama-cpp-python.
"""

from runtime.export.writer import export_checkpoint

__all__ = ["export_checkpoint"]
