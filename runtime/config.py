"""Typed run configuration: one dataclass per component, one YAML whose sections mirror them.

The network's sections (language_model, vision, projector, lora) are `model.config`'s; this file
adds data and training. Every field name is unique across the sections, so each field is also a
command-line flag of the same name (`--lora_rank 16`). Precedence: dataclass default < YAML
(`--config`) < flag. YAML values are type-checked like flags (`skip_invalid: "false"` is an error,
not true). The resolved configuration is written into the output directory as `train_config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from dataprocess.config import list_flag
from model.config import (
    LanguageModelConfig,
    LoraSettings,
    ProjectorConfig,
    VisionConfig,
    check_choice,
    resolve_defaults,
    validate_model_config,
)
from qwen.chat_format import DEFAULT_SYSTEM_PROMPT
from runtime.engines import check_engines
from runtime.preference import DPO_LOSSES, TRAINING_OBJECTIVES

REPORT_TO = ("tensorboard", "none")


@dataclass
class DataConfig:
    data_path: str = "demo_assets/shapes/train.json"
    image_folder: str | None = "demo_assets/shapes"
    eval_data_path: str | None = None
    # A dir from `python -m dataprocess features`: the frozen tower's outputs for every image, read
    # instead of decoding images and running the tower (it must match the vision settings)
    feature_cache: str | None = None
    model_max_length: int = 2048
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    skip_invalid: bool = False  # skip (and count) bad records instead of stopping
    # Image paths must stay inside image_folder unless this is set (absolute paths, "../")
    allow_outside_image_folder: bool = False
    # Less padding: batch samples of similar length together (a shuffled length-grouped sampler)
    group_by_length: bool = False
    # Pack several samples into rows of model_max_length tokens, isolated from each other
    packing: bool = False


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/demo"
    # Start over in an output_dir that holds another run's checkpoints (they are deleted)
    overwrite_output_dir: bool = False
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
    report_to: str = "tensorboard"  # one of REPORT_TO
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "latest"
    # Resume from a checkpoint without optimizer/scheduler state: weights only, fresh optimizer
    resume_weights_only: bool = False
    # Scale-out engines (runtime/engines.py), one at most: a DeepSpeed JSON
    # (configs/deepspeed/zero2.json; pip install -r requirements-scale.txt) or an FSDP2 JSON
    # (configs/fsdp/full_shard.json)
    deepspeed: str | None = None
    fsdp: str | None = None
    # Supervised tokens per chunk of the LM loss (lm_head + cross-entropy, qwen/loss.py): the loss's
    # memory is one chunk's logits, never the batch's; null = the default there
    lm_loss_chunk_size: int | None = None
    # "sft" (supervised answers) or "dpo" (preference pairs: records with chosen/rejected; see
    # runtime/preference.py): one of TRAINING_OBJECTIVES
    training_objective: str = "sft"
    # Start from a trained model: a training output, a checkpoint-N or a merged dir. Its network
    # settings, projector and LLM (its LoRA merged in memory) are the start; a fresh LoRA trains
    # on top (model/lineage.py); the flags' language_model / vision / projector settings are
    # replaced by its own, dtype and bits stay
    init_from: str | None = None
    dpo_beta: float = 0.1  # DPO's beta: how far the policy may move from the reference
    dpo_loss: str = "sigmoid"  # one of DPO_LOSSES
    # RPO: add this weight times the chosen answers' mean NLL to the DPO loss; null = plain DPO
    rpo_alpha: float | None = None
    # DPO: run the reference model over the training (and eval) pairs once before training, in
    # memory, so each step runs the policy only (one forward per step less; runtime/preference.py)
    precompute_ref_log_probs: bool = False


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


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in fields(RunConfig)}


def _scalar_type(annotation) -> tuple[type, bool]:
    """`int | None` -> (int, True); plain types -> (type, False)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _typed_value(value, annotation, where: str, key: str):
    """`value` as the field's type, or a ValueError naming the key and the expected type. A list
    field takes any list here; the owner of the field checks its items (`validate_config`)."""
    kind, optional = _scalar_type(annotation)
    if value is None:
        if optional:
            return None
    elif typing.get_origin(kind) is list:
        if isinstance(value, list):
            return value
        kind = list
    elif kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    expected = kind.__name__ + (" or null" if optional else "")
    raise ValueError(f"{where}: {key} must be {expected}, got {value!r}")


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file") from None
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Build a RunConfig from defaults, then a YAML file, then `overrides` ({field: value})."""
    sections = {name: cls() for name, cls in _section_classes().items()}
    if path is not None:
        for section, values in _load_yaml(Path(path)).items():
            if section not in sections:
                raise ValueError(
                    f"{path}: unknown section {section!r}; allowed: {', '.join(sections)}"
                )
            if values is not None and not isinstance(values, dict):
                raise ValueError(
                    f"{path}: section {section!r} must be a mapping of keys, got {values!r}"
                )
            _set_fields(sections[section], values or {}, where=f"{path} [{section}]")
    for name, value in (overrides or {}).items():
        owner = next((s for s in sections.values() if name in _field_names(s)), None)
        if owner is None:
            raise ValueError(f"unknown setting {name!r}")
        setattr(owner, name, value)
    config = RunConfig(**sections)
    if config.training.init_from is not None:
        inherit_network(config)
    resolve_defaults(config.vision)
    validate_config(config)
    return config


def inherit_network(config: RunConfig) -> None:
    """Replace the network sections by those of `--init_from`'s model (dtype and bits stay)."""
    from model.checkpoint import read_description

    parent = config.training.init_from
    if config.projector.projector_path is not None:
        raise ValueError("--init_from brings its own projector; drop --projector_path")
    if config.language_model.bits == 4:
        raise ValueError(
            "--bits 4 with --init_from: the started-from LLM is merged in 16/32-bit and would have "
            "to be quantized again; use --bits 16 (or merge it with python -m runtime.merge and "
            "train on the merged directory's language_model/)"
        )
    try:
        description = read_description(parent)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"--init_from {parent}: {error}") from None
    language = LanguageModelConfig(**description["language_model"])
    language.dtype, language.bits = config.language_model.dtype, config.language_model.bits
    config.language_model = language
    config.vision = VisionConfig(**description["vision"])
    config.projector = ProjectorConfig(**{**description["projector"], "projector_path": None})


def _field_names(obj) -> set[str]:
    return {f.name for f in fields(obj)}


def _set_fields(obj, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            allowed = ", ".join(sorted(hints))
            raise ValueError(f"{where}: unknown key {key!r}; allowed: {allowed}")
        setattr(obj, key, _typed_value(value, hints[key], where, key))


def validate_config(config: RunConfig) -> None:
    """Reject values that would otherwise fail hours later, naming the flag and allowed values."""
    validate_model_config(config.language_model, config.vision, config.projector, config.lora)
    check_choice("report_to", config.training.report_to, REPORT_TO)
    check_engines(config.training.deepspeed, config.training.fsdp, bits=config.language_model.bits)
    steps = config.training.max_steps
    if steps == 0 or steps < -1:  # the Trainer reads any value < 1 as "unset" (0 trained a step)
        raise ValueError(
            f"--max_steps must be a positive number of optimizer steps, or -1 to train "
            f"--num_train_epochs epochs; got {steps}"
        )
    _validate_objective(config)
    cache = config.data.feature_cache
    if cache is not None and not Path(cache).is_dir():
        raise ValueError(
            f"--feature_cache {cache!r}: no such directory; write one with "
            "`python -m dataprocess features`"
        )


def _validate_objective(config: RunConfig) -> None:
    t = config.training
    check_choice("training_objective", t.training_objective, TRAINING_OBJECTIVES)
    check_choice("dpo_loss", t.dpo_loss, DPO_LOSSES)
    if t.dpo_beta <= 0:
        raise ValueError(f"--dpo_beta must be positive, got {t.dpo_beta}")
    if t.rpo_alpha is not None and t.rpo_alpha < 0:
        raise ValueError(f"--rpo_alpha must be >= 0 (or unset), got {t.rpo_alpha}")
    if t.training_objective != "dpo":
        if t.precompute_ref_log_probs:
            raise ValueError(
                "--precompute_ref_log_probs applies to --training_objective dpo only (SFT has no "
                "reference model)"
            )
        return
    if t.precompute_ref_log_probs and (t.deepspeed or t.fsdp):
        raise ValueError(
            "--precompute_ref_log_probs cannot be used with --deepspeed or --fsdp: the engine "
            "places the model only once training starts; drop one of them"
        )
    if config.data.packing:
        raise ValueError(
            "--packing does not apply to --training_objective dpo (rows come in pairs)"
        )
    if config.lora.train_mode == "projector+llm":
        raise ValueError(
            "--training_objective dpo takes its reference model by disabling the LoRA adapter; "
            "--train_mode projector+llm has none (use projector+lora or projector)"
        )


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are None so only flags given on the command line win."""
    for section, cls in _section_classes().items():
        group = parser.add_argument_group(section)
        for name, annotation in typing.get_type_hints(cls).items():
            kind, _ = _scalar_type(annotation)
            if kind is bool:
                group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
            elif typing.get_origin(kind) is list:
                group.add_argument(f"--{name}", type=list_flag, default=None)
            else:
                group.add_argument(f"--{name}", type=kind, default=None)


def flag_overrides(args: argparse.Namespace) -> dict:
    names = {n for cls in _section_classes().values() for n in typing.get_type_hints(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
