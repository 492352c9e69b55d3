"""The run layer: the uses of a trained (or training) VLM, above `dataset/` and `model/`.

- `runtime.config`: the run's YAML + flags (the network's sections come from `model.config`);
- `runtime.trainer`, `runtime.data`, `runtime.reporting`: training wiring around the HF Trainer;
- `runtime.inference`: the one inference session (prompt from a conversation with history,
  generation) that `test.py` and every application call;
- `runtime.merge`: checkpoint transforms (LoRA merged into the base LLM).

A new application (export, evaluation, a web chat) is a module or package here with its own entry
point; it builds prompts and loads models only through `runtime.inference` and `model.checkpoint`.
"""
