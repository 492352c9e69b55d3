"""Run a GGUF export with llama.cpp itself (llama-cpp-python and its mtmd library): the checks of
tests/test_gguf_llama_cpp.py and the numbers of bench/gguf_speed.py.

The prompt is the export's own chat template (`tokenizer.chat_template` in model.gguf) rendered
with Jinja, each image placeholder replaced by mtmd's media marker; `mtmd_tokenize` splits it into
text chunks (tokenized by llama.cpp, control tokens parsed) and one image chunk per marker, which
`mtmd_helper_eval_chunk_single` encodes with mmproj.gguf and decodes into the KV cache. Greedy
decoding then reads llama.cpp's last logits, one token at a time, and stops on our ChatML stop ids.
`llama_cpp` is imported here only, so the rest of the toolkit runs without it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from qwen.tokenization_qwen import ENDOFTEXT, IM_END, IM_START
from runtime.export.gguf_export import IMAGE_TOKEN_KEY, MMPROJ_FILE, TEXT_FILE
from visual import load_image


class LlamaCppVLM:
    """model.gguf + mmproj.gguf loaded in llama.cpp (CPU), answering like InferenceSession."""

    _quiet = None  # the no-op log callback handed to mtmd

    def __init__(
        self,
        export_dir: str | Path,
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        f32_cache: bool = False,
    ) -> None:
        """`f32_cache` keeps the KV cache in f32 (llama.cpp's default is f16): the logits check."""
        import llama_cpp
        from llama_cpp import mtmd_cpp

        export_dir = Path(export_dir)
        self._llama_cpp, self._mtmd = llama_cpp, mtmd_cpp
        self.llama = llama_cpp.Llama(
            str(export_dir / TEXT_FILE),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=0,
            type_k=llama_cpp.GGML_TYPE_F32 if f32_cache else None,
            type_v=llama_cpp.GGML_TYPE_F32 if f32_cache else None,
            verbose=False,
        )
        # mtmd logs every chunk it adds or encodes to stderr; kept quiet (the callback must live
        # as long as the library may call it: a class attribute)
        if LlamaCppVLM._quiet is None:
            LlamaCppVLM._quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
        mtmd_cpp.mtmd_log_set(LlamaCppVLM._quiet, None)
        mtmd_cpp.mtmd_helper_log_set(LlamaCppVLM._quiet, None)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        self.mtmd = mtmd_cpp.mtmd_init_from_file(
            str(export_dir / MMPROJ_FILE).encode(), self.llama.model, params
        )
        if not self.mtmd:
            raise ValueError(f"llama.cpp could not load {export_dir / MMPROJ_FILE}")
        self.llama._stack.callback(mtmd_cpp.mtmd_free, self.mtmd)
        metadata = self.llama.metadata
        self.image_token = metadata[IMAGE_TOKEN_KEY]
        self.template = ImmutableSandboxedEnvironment().from_string(
            metadata["tokenizer.chat_template"]
        )
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        # the ChatML stop ids of `dataset.conversation.chat_stop_token_ids`, by their text
        self.stop_ids = {
            self.llama.tokenize(token.encode(), add_bos=False, special=True)[0]
            for token in (IM_END, IM_START, ENDOFTEXT)
        }

    def prompt_text(self, roles, contents, system_prompt: str | None = None) -> str:
        """Our ChatML prompt by the exported template, images as mtmd's media marker."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
        text = self.template.render(messages=messages, add_generation_prompt=True)
        return text.replace(self.image_token, self.marker)

    def prefill(self, text: str, images: Sequence[str | Path | Image.Image] = ()) -> list[int]:
        """Evaluate the prompt from an empty cache; returns the text token ids llama.cpp used."""
        mtmd, llama = self._mtmd, self.llama
        bitmaps = [self._bitmap(image) for image in images]
        chunks = mtmd.mtmd_input_chunks_init()
        text_ids: list[int] = []
        try:
            raw = text.encode()
            inp = mtmd.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), False, True
            array = (mtmd.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
            if mtmd.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(inp), array, len(bitmaps)):
                raise ValueError("mtmd_tokenize failed: markers and images do not pair up")
            llama.reset()
            llama._ctx.kv_cache_clear()
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                text_ids += self._eval_chunk(mtmd.mtmd_input_chunks_get(chunks, i))
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        return text_ids

    def _eval_chunk(self, chunk) -> list[int]:
        mtmd, llama = self._mtmd, self.llama
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            count = ctypes.c_size_t()
            pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
            ids = (
                np.ctypeslib.as_array(pointer, shape=(count.value,)).tolist() if count.value else []
            )
            if ids:
                llama.eval(ids)
            return ids
        n_past = self._llama_cpp.llama_pos(0)
        if mtmd.mtmd_helper_eval_chunk_single(
            self.mtmd, llama._ctx.ctx, chunk, llama.n_tokens, 0, llama.n_batch, False,
            ctypes.byref(n_past),
        ):  # fmt: skip
            raise ValueError("llama.cpp could not encode or decode an image chunk")
        llama.n_tokens = n_past.value
        return []

    def last_logits(self) -> np.ndarray:
        """The logits after the last evaluated token, [vocab] float32 (a copy)."""
        pointer = self._llama_cpp.llama_get_logits_ith(self.llama._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llama.n_vocab(),)).copy()

    def generate(self, text: str, images=(), *, max_new_tokens: int) -> list[int]:
        """Greedy continuation of the prompt, stop token excluded."""
        self.prefill(text, images)
        out: list[int] = []
        for _ in range(max_new_tokens):  # autoregressive: one token per llama.cpp decode
            token = int(np.argmax(self.last_logits()))
            if token in self.stop_ids:
                break
            out.append(token)
            self.llama.eval([token])
        return out

    def answer(self, roles, contents, images=(), *, system_prompt=None, max_new_tokens: int):
        """The greedy reply, as `InferenceSession.answer` gives it (stripped text)."""
        text = self.prompt_text(roles, contents, system_prompt)
        ids = self.generate(text, images, max_new_tokens=max_new_tokens)
        return self.llama.detokenize(ids).decode("utf-8", errors="replace").strip()

    def close(self) -> None:
        """Free the mtmd context, the llama.cpp context and model now (not at interpreter exit)."""
        self.llama.close()

    def _bitmap(self, image):
        rgb = load_image(image)  # the one decoder: the pixels our session sees
        data = rgb.tobytes()
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmap = self._mtmd.mtmd_bitmap_init(rgb.width, rgb.height, buffer)
        if not bitmap:
            raise ValueError(f"llama.cpp could not take the image {image}")
        return bitmap
