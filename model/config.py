"""Typed run configuration: one dataclass per component, one YAML whose sections mirror them.

Every field name is unique across the sections, so each field is also a command-line flag of the
same name (`--lora_rank 16`). Precedence: dataclass default < YAML (`--config`) < flag. The
resolved configuration is written into the output directory as `train_config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


@dataclass
class LanguageModelConfig:
    language_model: str = "demo_assets/tiny-qwen"  # local dir or hub id
    image_token: str | None = None  # placeholder token; None = "<|extra_0|>" for Qwen-7B
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    bits: int = 16  # 16, or 4 for QLoRA (NF4)


@dataclass
class VisionConfig:
    vision_model: str = "demo_assets/tiny-clip"  # local dir, hub id, or open_clip model name
    vision_library: str = "transformers"  # transformers | open_clip
    vision_pretrained: str | None = None  # open_clip pretrained tag or weights file
    vision_feature_layer: int = -2
    image_aspect_ratio: str = "pad"  # pad | resize


@dataclass
class ProjectorConfig:
    projector_type: str = "mlp2x_gelu"  # mlp2x_gelu | resampler
    num_queries: int = 256  # resampler only
    projector_path: str | None = None  # start from a trained projector (e.g. stage 1's output dir)


@dataclass
class LoraSettings:
    train_mode: str = "projector+lora"  # projector | projector+lora | projector+llm
    lora_rank: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str = "c_attn|w1|w2"  # module names inside the LLM, "|"-separated
    # LLM modules trained in full next to LoRA, "|"-separated (peft `modules_to_save`), e.g.
    # "ln_f" or "wte|lm_head" (Qwen's recipe for base models, whose ChatML tokens are untrained)
    modules_to_save: str | None = None


@dataclass
class DataConfig:
    data_path: str = "demo_assets/shapes/train.json"
    image_folder: str | None = "demo_assets/shapes"
    eval_data_path: str | None = None
    # A dir from `python -m dataprocess features`: the frozen tower's outputs for every image, read
    # instead of decoding images and running the tower (it must match the vision settings)
    feature_cache: str | None = None
    model_max_length: int = 2048
    system_prompt: str = "You are a helpful assistant."
    skip_invalid: bool = False  # skip (and count) bad records instead of stopping
    # Less padding: batch samples of similar length together (a shuffled length-grouped sampler)
    group_by_length: bool = False
    # Pack several samples into rows of model_max_length tokens, isolated from each other
    packing: bool = False


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/demo"
    learning_rate: float = 2e-4  # LoRA / LLM parameters
    feature_proj_lr: float = 1e-3  # projector parameters
    weight_decay: float = 0.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    warmup_steps: int = 0
    lr_scheduler_type: str = "cosine"
    save_steps: int = 1000
    save_total_limit: int | None = 5
    logging_steps: int = 10
    seed: int = 42
    gradient_checkpointing: bool = False
    dataloader_num_workers: int = 2
    report_to: str = "tensorboard"  # tensorboard | none
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "latest"
    deepspeed: str | None = None  # a DeepSpeed JSON (configs/deepspeed/zero2.json); needs deepspeed


@dataclass
class RunConfig:
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in fields(RunConfig)}
TRAIN_MODES = ("projector", "projector+lora", "projector+llm")


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in SECTIONS}


def _scalar_type(annotation) -> type:
    """`int | None` -> int; plain types pass through."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Build a RunConfig from defaults, then a YAML file, then `overrides` ({field: value})."""
    sections = {name: cls() for name, cls in _section_classes().items()}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a mapping of sections")
        for section, values in data.items():
            if section not in sections:
                raise ValueError(
                    f"{path}: unknown section {section!r}; allowed: {', '.join(sections)}"
                )
            _set_fields(sections[section], values or {}, where=f"{path} [{section}]")
    for name, value in (overrides or {}).items():
        owner = next((s for s in sections.values() if name in _field_names(s)), None)
        if owner is None:
            raise ValueError(f"unknown setting {name!r}")
        setattr(owner, name, value)
    config = RunConfig(**sections)
    validate_config(config)
    return config


def _field_names(obj) -> set[str]:
    return {f.name for f in fields(obj)}


def _set_fields(obj, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            allowed = ", ".join(sorted(hints))
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {allowed}")
        kind = _scalar_type(hints[key])
        if value is not None and kind is float and isinstance(value, int | str):
            value = float(value)  # YAML reads 1e-3 as a string and 1 as an int
        setattr(obj, key, value)


def validate_config(config: RunConfig) -> None:
    """Reject values that would otherwise fail hours later, naming the flag and allowed values."""
    checks = [
        ("train_mode", config.lora.train_mode, TRAIN_MODES),
        ("vision_library", config.vision.vision_library, ("transformers", "open_clip")),
        ("image_aspect_ratio", config.vision.image_aspect_ratio, ("pad", "resize")),
        ("projector_type", config.projector.projector_type, ("mlp2x_gelu", "resampler")),
        ("dtype", config.language_model.dtype, ("auto", "float32", "bfloat16", "float16")),
        ("bits", config.language_model.bits, (16, 4)),
        ("report_to", config.training.report_to, ("tensorboard", "none")),
    ]
    for flag, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"--{flag} {value!r} is not one of {', '.join(map(str, allowed))}")
    deepspeed = config.training.deepspeed
    if deepspeed is not None and not Path(deepspeed).is_file():
        raise ValueError(
            f"--deepspeed {deepspeed!r}: no such file (e.g. configs/deepspeed/zero2.json)"
        )
    cache = config.data.feature_cache
    if cache is not None and not Path(cache).is_dir():
        raise ValueError(
            f"--feature_cache {cache!r}: no such directory; write one with "
            "`python -m dataprocess features`"
        )
    if config.language_model.bits == 4 and config.lora.train_mode == "projector+llm":
        raise ValueError(
            "--bits 4 (QLoRA) cannot train the full LLM; use --train_mode projector+lora"
        )


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are None so only flags given on the command line win."""
    for section, cls in _section_classes().items():
        group = parser.add_argument_group(section)
        for name, annotation in typing.get_type_hints(cls).items():
            kind = _scalar_type(annotation)
            if kind is bool:
                group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
            else:
                group.add_argument(f"--{name}", type=kind, default=None)


def flag_overrides(args: argparse.Namespace) -> dict:
    names = {n for cls in _section_classes().values() for n in typing.get_type_hints(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
