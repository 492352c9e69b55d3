"""Train a vision-language model: read the config, build, run. See README.md for the flags.

python train.py --config configs/demo.yaml [--flag value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from runtime.cli import silence_known_warnings
from runtime.config import add_config_flags, flag_overrides, load_config
from runtime.stopping import TrainingStopped, explained_stops

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Train a Qwen + CLIP/SigLIP VLM with LoRA.")
    parser.add_argument("--config", help="YAML recipe; flags override its values")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    return load_config(args.config, flag_overrides(args))


def build_model(config):
    """The VLM as its recipe says, ready to train: (vlm, tokenizer). Seeded, so the fresh projector
    and LoRA weights are the same in every process and every run."""
    from transformers import set_seed

    from model.builder import build_vlm
    from model.checkpoint import load_projector_weights
    from model.trainable import configure_trainable

    set_seed(config.training.seed)
    if config.training.init_from is not None:
        from model.lineage import load_merged

        vlm, tokenizer, _ = load_merged(
            config.training.init_from, dtype=config.language_model.dtype
        )
        vlm.train()
        set_seed(config.training.seed)  # the fresh LoRA's weights do not depend on the load
        logger.info("started from %s (its LoRA merged)", config.training.init_from)
    else:
        vlm, tokenizer = build_vlm(config.language_model, config.vision, config.projector)
    if config.training.lm_loss_chunk_size is not None:  # read by qwen/loss.py, for every LLM
        vlm.llm.config.lm_loss_chunk_size = config.training.lm_loss_chunk_size
    if config.projector.projector_path:
        load_projector_weights(vlm, config.projector.projector_path)
        logger.info("projector initialised from %s", config.projector.projector_path)
    configure_trainable(
        vlm,
        config.lora,
        quantized=config.language_model.bits == 4,
        gradient_checkpointing=config.training.gradient_checkpointing,
    )
    return vlm, tokenizer


def run_description(vlm, config) -> dict:
    """What every checkpoint of this run says it is (model/checkpoint.py's `vlm_config.json`)."""
    from model.checkpoint import INIT_FROM, describe
    from model.lineage import parent_record
    from runtime.resume import TRAINING_DATA, data_identity

    network = (config.language_model, config.vision, config.projector)
    description = describe(vlm, *network, system_prompt=config.data.system_prompt)
    if config.training.init_from is not None:  # loading rebuilds it first (model/lineage.py)
        description[INIT_FROM] = parent_record(config.training.init_from)
    return {**description, TRAINING_DATA: data_identity(config.data)}


def check_prompt_flags(config) -> None:
    """Tokens that would break the chat layout every sample is rendered in, refused at start."""
    from runtime.inference import CONTROL_TOKEN_TEXT, check_system_prompt

    image_token = config.language_model.image_token
    if image_token in CONTROL_TOKEN_TEXT:
        raise ValueError(
            f"--image_token {image_token!r} is a chat control token (image rows would replace the "
            "turn markers); use a token of its own, e.g. '<|extra_0|>' for Qwen-7B"
        )
    check_system_prompt(config.data.system_prompt)


def main(argv: list[str] | None = None):
    """Trains; returns the Trainer (its `state.log_history` holds the losses). Everything that
    can be refused (flags, output directory, the checkpoint to resume) is, before a model loads."""
    silence_known_warnings()
    config = parse_args(argv)
    check_prompt_flags(config)
    from runtime.engines import check_engine_device

    check_engine_device(config.training.fsdp)
    from runtime.resume import check_resume
    from runtime.run_dir import claim_output_dir

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    with claim_output_dir(config.training, rank) as resume:  # locked until the run ends
        if resume is not None:
            check_resume(config, resume, world_size=world_size, rank=rank)
        with explained_stops(Path(config.training.output_dir), rank):  # full disk, Ctrl-C
            return run(config, resume, rank)


def run(config, resume: str | None, rank: int = 0):
    """Builds, trains and saves into the claimed output dir; `resume` is a checked checkpoint."""
    from model.checkpoint import save_description
    from model.config import resolve_dtype
    from runtime.config import save_config
    from runtime.data import build_datasets
    from runtime.engines import needs_tower_probe
    from runtime.reporting import plot_loss_curve
    from runtime.resume import TRAIN_CONFIG
    from runtime.stopping import save_final
    from runtime.trainer import VLMTrainer, training_arguments

    vlm, tokenizer = build_model(config)
    vlm.probe_tower = needs_tower_probe(config.training.deepspeed, config.data.feature_cache)
    description = run_description(vlm, config)
    out = Path(config.training.output_dir)
    if rank == 0:  # a run that dies early still says what it was
        save_config(config, out / TRAIN_CONFIG)
        save_description(description, out)
    objective = config.training.training_objective
    train_data, eval_data, collator = build_datasets(config.data, vlm, tokenizer, objective)
    dtype = resolve_dtype(config.language_model.dtype)
    trainer = VLMTrainer(
        model=vlm,
        args=training_arguments(config, dtype, has_eval=eval_data is not None, llm=vlm.llm),
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=tokenizer,
        run_config=config,
        description=description,
    )
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, out)
    logger.info("saved the trained weights to %s", out)
    if trainer.is_world_process_zero():
        plot = plot_loss_curve(trainer.state.log_history, out / "loss.png")
        if plot is not None:
            logger.info("loss curve: %s", plot)
    return trainer


def end_process_group() -> None:
    """Closes the distributed process group the Trainer opened, if any. Left to interpreter exit,
    its communication threads can still be running when the process is torn down, and the process
    then aborts ("terminate called without an active exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))  # log from the first process only
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # user mistakes: one clear line, no traceback
        logger.error("%s", error)
        sys.exit(2)
    except TrainingStopped as stop:  # a full disk or Ctrl-C: what failed and what is intact
        logger.error("%s", stop)
        sys.exit(stop.exit_code)
    finally:
        end_process_group()
