"""The HF Trainer, adapted to the VLM: two learning rates, small checkpoints, exact resume.

- The projector gets its own optimizer groups at `feature_proj_lr`; everything else that trains
  (LoRA adapters, or the full LLM) uses `learning_rate`. The scheduler scales both groups, and both
  rates are logged (`learning_rate` is the LLM's, `learning_rate_projector` the projector's).
- Checkpoints hold only the trainable weights (see `model/checkpoint.py`) plus the Trainer's
  optimizer, scheduler, RNG and data-position state, so `resume_from_checkpoint` continues exactly;
  a missing or damaged file is refused, naming it, instead of skipped (`runtime/resume.py`).
- `--training_objective dpo`: `compute_loss` is the preference loss (`runtime/preference.py`) and
  its rewards are logged beside the loss, averaged over the logging window and the processes,
  and an evaluation's as `eval_rewards/...` beside `eval_loss` (averaged over all its pairs).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from accelerate.utils import save_fsdp_optimizer
from torch import nn
from transformers import Trainer
from transformers.integrations.deepspeed import deepspeed_load_checkpoint
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from model.checkpoint import CheckpointError, save_trainable
from runtime.config import RunConfig, save_config
from runtime.engines import (
    deepspeed_settings,
    fsdp_settings,
    gathered_trainable_state,
    zero_stage,
)
from runtime.preference import PreferenceObjective, RewardMeans, precompute_reference
from runtime.reporting import ThroughputCallback
from runtime.resume import (
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    TORCH_LOAD_ERRORS,
    TRAIN_CONFIG,
    first_line,
    load_torch_state,
    load_trainable_state,
    rng_state_file,
)

logger = logging.getLogger(__name__)

PROJECTOR_GROUP = "projector"
LLM_GROUP = "llm"


class VLMTrainer(Trainer):
    def __init__(self, *args, run_config: RunConfig, description: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_config = run_config
        self.description = description
        self.throughput = ThroughputCallback()
        self.add_callback(self.throughput)
        t = run_config.training
        self.preference = None
        if t.training_objective == "dpo":  # before training changes a weight: the reference
            self.preference = PreferenceObjective(
                self.model, beta=t.dpo_beta, loss_type=t.dpo_loss, rpo_alpha=t.rpo_alpha
            )
        self.rewards = RewardMeans()
        self.eval_rewards = RewardMeans()  # logged as eval_rewards/..., with eval_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The LM loss (the model's own), or with `dpo` the preference loss of the pairs."""
        if self.preference is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        vlm = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        loss, metrics = self.preference(model, vlm, inputs)
        means = self.rewards if model.training else self.eval_rewards  # every process's pairs
        means.add({k: self.accelerator.gather_for_metrics(v) for k, v in metrics.items()})
        return (loss, metrics) if return_outputs else loss  # evaluation reads a dict

    def get_batch_samples(self, *args, **kwargs):
        """The Trainer's batch fetch, timed: the time blocked on the data loader is logged."""
        start = time.perf_counter()
        batches = super().get_batch_samples(*args, **kwargs)
        self.throughput.add_data_wait(time.perf_counter() - start)
        return batches

    def _get_train_sampler(self, train_dataset=None):
        """`--group_by_length`: transformers' shuffled length-grouped sampler over the lengths the
        dataset already knows (the default would load every sample, images included, to count)."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not self.run_config.data.group_by_length:
            return super()._get_train_sampler(dataset)
        return LengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps,
            lengths=dataset.lengths,
        )

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        rates = {
            PROJECTOR_GROUP: self.run_config.training.feature_proj_lr,
            LLM_GROUP: self.args.learning_rate,
        }
        buckets: dict[tuple[str, bool], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            group = PROJECTOR_GROUP if name.startswith("projector.") else LLM_GROUP
            buckets.setdefault((group, name in decay), []).append(param)
        groups = [
            {
                "params": params,
                "lr": rates[group],
                "weight_decay": self.args.weight_decay if decayed else 0.0,
                "group_name": group,
            }
            for (group, decayed), params in sorted(buckets.items())
        ]
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def group_learning_rates(self) -> dict[str, float]:
        """Current learning rate of each named group (after the scheduler)."""
        return {g["group_name"]: g["lr"] for g in self.optimizer.param_groups}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.optimizer is not None and "loss" in logs:
            rates = self.group_learning_rates()
            if LLM_GROUP in rates:
                logs["learning_rate"] = rates[LLM_GROUP]
            if PROJECTOR_GROUP in rates:
                logs["learning_rate_projector"] = rates[PROJECTOR_GROUP]
            logs.update(self.throughput.measure(self.state.num_input_tokens_seen))
            logs.update(self.rewards.pop())
        if "eval_loss" in logs:  # the evaluation's pairs, named as TRL names them
            logs.update({f"eval_{name}": mean for name, mean in self.eval_rewards.pop().items()})
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the trainable weights only, whole: under ZeRO-3 or FSDP every rank helps gather
        them (never the frozen base), then the first process writes them as one process would."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and self._zero3)
        gathered = gathered_trainable_state(model) if sharded else None
        if not self.args.should_save:
            return
        save_trainable(model, self.processing_class, output_dir, self.description, gathered)
        save_config(self.run_config, Path(output_dir) / TRAIN_CONFIG)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    @property
    def _zero3(self) -> bool:
        return zero_stage(self.accelerator.state.deepspeed_plugin.deepspeed_config) == 3

    def _save_checkpoint(self, model, trial) -> None:
        """Writes `tmp-checkpoint-N/` and renames it to `checkpoint-N/` only once it is complete.

        A kill during a save leaves a `tmp-` directory, which `get_last_checkpoint` (regex
        `^checkpoint-\\d+$`) and the rotation of old checkpoints both ignore; the next save of that
        step replaces it. Replaces the Trainer's version, which writes in place.
        """
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        run_dir = Path(self._get_output_dir(trial=trial))
        final, staging = run_dir / name, run_dir / f"tmp-{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by a killed run
        self.accelerator.wait_for_everyone()  # no rank writes into a directory being removed
        self.store_flos()
        self.save_model(str(staging), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))  # one file per rank
        if self.args.should_save:
            stateful = self.state.stateful_callbacks
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    name = type(callback).__name__
                    if isinstance(stateful.get(name), list):
                        stateful[name].append(callback.state())
                    else:
                        stateful[name] = callback.state()
            self.state.save_to_json(str(staging / "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every rank has written its part
        if self.args.should_save:
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(staging, final)
            rotate_checkpoints(
                str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """DeepSpeed and FSDP keep the optimizer in their own formats, written here without the
        frozen base (the Trainer would add every frozen weight to each checkpoint): DeepSpeed's
        checkpoint excludes frozen weights, FSDP writes the optimizer only; the trainable weights
        are in the checkpoint's own files (`save_model`)."""
        if self.is_deepspeed_enabled:
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        elif self.is_fsdp_enabled:
            plugin = self.accelerator.state.fsdp_plugin
            save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        else:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        if self.args.should_save:  # the Trainer's scheduler (engine files never hold one here)
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """A DeepSpeed checkpoint of this trainer holds no frozen weights, so it is loaded
        non-strictly here (the Trainer loads it strictly: every frozen weight would be missing)."""
        if not (self.is_deepspeed_enabled and resume_from_checkpoint):
            return super()._prepare_for_training(
                max_steps, train_dataloader, resume_from_checkpoint
            )
        prepared = super()._prepare_for_training(max_steps, train_dataloader, None)
        deepspeed_load_checkpoint(
            self.model_wrapped, resume_from_checkpoint, load_module_strict=False
        )
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        return prepared

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """`resume_from_checkpoint` resumes exactly (see `runtime/resume.py`); with the run's
        `resume_weights_only` it loads only the trainable weights and starts a new run at step 0.
        Under FSDP the weights are loaded here, before the Trainer shards the model."""
        if self.run_config.training.precompute_ref_log_probs:
            self._precompute_reference()
        if resume_from_checkpoint is None or not self.run_config.training.resume_weights_only:
            if resume_from_checkpoint is not None and self.is_fsdp_enabled:
                load_trainable_state(self.model, resume_from_checkpoint)
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        load_trainable_state(self.model, resume_from_checkpoint)
        logger.warning(
            "NOT AN EXACT RESUME (--resume_weights_only): loaded only the trainable weights of %s; "
            "the optimizer, learning-rate schedule, data order and step count start fresh at "
            "step 0, and --max_steps counts from there",
            resume_from_checkpoint,
        )
        return super().train(**kwargs)

    def _precompute_reference(self) -> None:
        """`--precompute_ref_log_probs`: the reference's log-probs of the train and eval pairs,
        handed to the datasets (at every start: they depend on the starting model only)."""
        start = time.perf_counter()
        for dataset in (self.train_dataset, self.eval_dataset):
            if dataset is None or dataset.reference_log_probs is not None:
                continue
            with self.accelerator.autocast():  # the precision the steps' forwards run in
                dataset.reference_log_probs = precompute_reference(
                    self.preference,
                    self.model,
                    dataset,
                    self.data_collator,
                    batch_size=self.args.per_device_eval_batch_size,
                    device=self.args.device,
                    shard=(self.args.process_index, self.args.world_size),
                    gather=self.accelerator.gather,
                )
        logger.info("reference log-probs precomputed in %.1f s", time.perf_counter() - start)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:
            return  # loaded before sharding (`train`)
        model = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
        load_trainable_state(model, resume_from_checkpoint)
        logger.info("resumed trainable weights from %s", resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's version skips missing files and lets torch's errors through; this one
        names the file (DeepSpeed and FSDP keep their own formats: the Trainer loads those)."""
        if checkpoint is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        load_torch_state(self.optimizer, Path(checkpoint) / OPTIMIZER_FILE)
        with warnings.catch_warnings():  # torch's reminder to also load the optimizer: done above
            warnings.filterwarnings("ignore", message="Please also save or load the state")
            load_torch_state(self.lr_scheduler, Path(checkpoint) / SCHEDULER_FILE)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """The Trainer's version goes on without a missing file (not exact); this one refuses."""
        if checkpoint is None:
            return
        path = rng_state_file(checkpoint, self.args.world_size, self.args.process_index)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, so this resume would not be exact")
        try:
            super()._load_rng_state(checkpoint)
        except (*TORCH_LOAD_ERRORS, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: damaged ({first_line(error)})") from None


def training_arguments(config: RunConfig, dtype: torch.dtype, has_eval: bool, llm: nn.Module):
    """TrainingArguments from the `training` section; the rest is fixed by this design."""
    from transformers import TrainingArguments

    t = config.training
    engine = {}
    if t.deepspeed is not None:
        engine["deepspeed"] = deepspeed_settings(t.deepspeed, llm)
    if t.fsdp is not None:
        engine.update(fsdp=True, fsdp_config=fsdp_settings(t.fsdp, llm))
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.save_steps if has_eval else None,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16 and on_gpu,
        fp16=dtype == torch.float16 and on_gpu,
        use_cpu=not on_gpu,
        report_to=[] if t.report_to == "none" else [t.report_to],
        remove_unused_columns=False,  # pixel_values is not a column the Trainer knows
        prediction_loss_only=True,  # the LM loss skips full-vocabulary logits
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=on_gpu,
        dataloader_persistent_workers=t.dataloader_num_workers > 0,
        ddp_find_unused_parameters=False,
        gradient_checkpointing=False,  # enabled on the LLM itself (model/trainable.py)
        label_names=["labels"],
        include_num_input_tokens_seen="non_padding",  # for tokens_per_second
        **engine,
    )
