"""`python -m runtime.export --format gguf`: llama.cpp's names, keys and values, the guarantees
of the HF export (whole or nothing, busy destinations refused, byte-identical), the refusals.
Running the files in llama.cpp itself: tests/test_gguf_llama_cpp.py."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from demo.tiny_towers import save_tiny_open_clip_tower
from model.checkpoint import load_vlm
from model.config import ProjectorConfig, VisionConfig
from qwen.tokenization_qwen import IM_END, SPECIAL_TOKENS
from runtime.export.gguf_export import MMPROJ_FILE, MODELFILE, TEXT_FILE, export_gguf
from runtime.export.gguf_text import check_text_model, text_hparams, text_tensors
from runtime.export.tokenizer import chat_template
from tests.test_export import SYSTEM, make_checkpoint, run_export

pytestmark = pytest.mark.slow  # each export converts a 151k-token vocabulary


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def bases(tiny_qwen_dir, tiny_clip_dir):
    return {"qwen": tiny_qwen_dir, "clip": tiny_clip_dir}


@pytest.fixture(scope="module")
def checkpoint(work, bases):
    return make_checkpoint(work / "qwen-clip", bases, "qwen", VisionConfig(str(bases["clip"])))


@pytest.fixture(scope="module")
def f32_export(work, checkpoint):
    return export_gguf(checkpoint, work / "f32", outtype="f32")


def fields(path) -> tuple[dict, dict]:
    """({key: value}, {tensor name: array in ggml's reversed shape order}) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    keys = {key: field.contents() for key, field in reader.fields.items()}
    return keys, {tensor.name: tensor for tensor in reader.tensors}


def as_torch(tensor) -> torch.Tensor:
    """A GGUF tensor in torch's shape order (ggml stores dimensions innermost first)."""
    return torch.from_numpy(np.array(tensor.data)).reshape(tuple(reversed(tensor.shape.tolist())))


def test_text_gguf_is_llama_cpp_qwen2_with_our_weights_and_tokenizer(f32_export, checkpoint):
    keys, tensors = fields(f32_export / TEXT_FILE)
    vlm, tokenizer, _ = load_vlm(checkpoint, dtype="float32")
    llm = vlm.llm.merge_and_unload()
    assert keys["general.architecture"] == "qwen2" and keys["tokenizer.ggml.pre"] == "qwen2"
    assert keys["qwen2.block_count"] == 2 and keys["qwen2.feed_forward_length"] == 128
    assert keys["qwen2.context_length"] == 2048 and keys["qwen2.attention.head_count_kv"] == 4
    assert len(tensors) == 3 + 2 * 12  # embeddings, norm, head + 12 per block
    source = llm.state_dict()
    q, k, v = source["transformer.h.1.attn.c_attn.weight"].chunk(3)
    assert torch.equal(as_torch(tensors["blk.1.attn_k.weight"]), k)  # LoRA merged, c_attn split
    assert torch.equal(
        as_torch(tensors["blk.1.ffn_gate.weight"]), source["transformer.h.1.mlp.w2.weight"]
    )
    assert torch.equal(as_torch(tensors["output.weight"]), source["lm_head.weight"])
    tokens, types = keys["tokenizer.ggml.tokens"], keys["tokenizer.ggml.token_type"]
    assert len(tokens) == 151936 and len(keys["tokenizer.ggml.merges"]) > 151000
    first_special = 151643
    assert tokens[first_special : first_special + len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert set(types[first_special : first_special + len(SPECIAL_TOKENS)]) == {
        gguf.TokenType.CONTROL
    }
    assert tokens[-1] == "[PAD151935]" and types[-1] == gguf.TokenType.UNUSED
    assert tokens[tokenizer.encode_ids("Hello")[0]] == "Hello"
    assert keys["tokenizer.ggml.eos_token_id"] == tokens.index(IM_END)
    assert keys["tokenizer.ggml.add_bos_token"] is False
    assert keys["tokenizer.chat_template"] == chat_template("<|extra_0|>", SYSTEM)
    assert keys["vlm.image_token_id"] == vlm.image_token_id == tokens.index("<|extra_0|>")


def test_mmproj_gguf_is_the_tower_to_its_feature_layer_and_the_llava_projector(
    f32_export, checkpoint
):
    keys, tensors = fields(f32_export / MMPROJ_FILE)
    vlm, _, _ = load_vlm(checkpoint, dtype="float32")
    assert keys["general.architecture"] == "clip" and keys["clip.projector_type"] == "mlp"
    # feature layer -2 of 2 blocks: hidden_states[1], the output of block 0; block 1 never runs
    assert keys["clip.vision.feature_layer"] == [1] and keys["clip.vision.block_count"] == 1
    assert "clip.use_gelu" not in keys  # CLIP's quick-GELU is llama.cpp's default
    assert keys["clip.vision.image_size"] == 32 and keys["clip.vision.patch_size"] == 8
    assert keys["clip.vision.projection_dim"] == 64
    assert np.allclose(keys["clip.vision.image_mean"], vlm.vision.preprocessor.mean)
    assert not any(name.startswith(("v.post_ln", "v.blk.1.")) for name in tensors)
    tower = vlm.vision.model.state_dict()
    assert torch.equal(
        as_torch(tensors["v.blk.0.ffn_up.weight"]), tower["encoder.layers.0.mlp.fc1.weight"]
    )
    assert torch.equal(as_torch(tensors["v.class_embd"]), tower["embeddings.class_embedding"])
    assert torch.equal(as_torch(tensors["mm.2.weight"]), vlm.projector.linear_2.weight)


def test_modelfile_points_at_both_files_with_chatml_and_stops(f32_export):
    text = (f32_export / MODELFILE).read_text()
    assert text.startswith(f"FROM ./{TEXT_FILE}\nFROM ./{MMPROJ_FILE}\n")
    assert f'SYSTEM """{SYSTEM}"""' in text and 'PARAMETER stop "<|im_end|>"' in text


def test_export_is_byte_identical_and_in_the_outtype(work, checkpoint, f32_export):
    again = export_gguf(checkpoint, work / "f32-again", outtype="f32")
    for name in (TEXT_FILE, MMPROJ_FILE, MODELFILE):
        assert (again / name).read_bytes() == (f32_export / name).read_bytes(), name
    q8 = export_gguf(checkpoint, work / "q8", outtype="q8_0")
    keys, tensors = fields(q8 / TEXT_FILE)
    assert keys["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    _, vision = fields(q8 / MMPROJ_FILE)  # the tower stays f16 (patch embedding f32)
    assert vision["v.blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert vision["v.patch_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_what_llama_cpp_cannot_run_is_refused_before_writing(work, bases):
    resampler = make_checkpoint(
        work / "resampler", bases, "qwen", VisionConfig(str(bases["clip"])),
        ProjectorConfig(projector_type="resampler", num_queries=4),
    )  # fmt: skip
    result = run_export(str(resampler), str(work / "resampler-gguf"), "--format", "gguf")
    assert result.returncode == 2, result.stderr
    assert "projector is 'resampler'" in result.stderr and "mlp2x_gelu" in result.stderr
    open_clip = save_tiny_open_clip_tower(work / "tiny-open-clip")
    vision = VisionConfig(str(open_clip), vision_library="open_clip")
    checkpoint = make_checkpoint(work / "open-clip", bases, "qwen", vision)
    with pytest.raises(ValueError, match="comes from 'open_clip'.*CLIP or SigLIP"):
        export_gguf(checkpoint, work / "open-clip-gguf")
    assert not (work / "resampler-gguf").exists() and not (work / "open-clip-gguf").exists()


def test_a_busy_destination_is_refused_unless_overwrite(work, checkpoint):
    busy = work / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("a user's file")
    result = run_export(str(checkpoint), str(busy), "--format", "gguf", "--outtype", "q8_0")
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (busy / "keep.txt").read_text() == "a user's file"
    export_gguf(checkpoint, busy, overwrite=True)  # what --overwrite does, in-process
    assert sorted(p.name for p in busy.iterdir()) == sorted([MODELFILE, MMPROJ_FILE, TEXT_FILE])


def test_a_transformers_qwen2_keeps_its_weights_under_the_same_names():
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)  # fmt: skip
    llm = Qwen2ForCausalLM(config)
    check_text_model(llm)
    tensors = text_tensors(llm)
    assert len(tensors) == 3 + 2 * 12 and text_hparams(llm)["head_count_kv"] == 2
    assert (
        tensors["blk.1.attn_k.bias"].data_ptr()
        == llm.model.layers[1].self_attn.k_proj.bias.data_ptr()
    )
    assert tensors["output.weight"].data_ptr() == llm.lm_head.weight.data_ptr()


def test_an_llm_llama_cpp_qwen2_cannot_hold_is_named():
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4)  # fmt: skip
    with pytest.raises(ValueError, match="model_type 'llama'.*--format hf"):
        check_text_model(LlamaForCausalLM(config))
