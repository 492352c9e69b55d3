"""The HF Trainer hooks `runtime/trainer.py` relies on, pinned, so that a transformers upgrade that
changes one fails CI loudly instead of resuming inexactly.

`VLMTrainer` uses public extension points where they exist (`create_optimizer`, `log`,
`save_model`, `get_batch_samples`, `train`, callbacks) and seven private hooks where none does:
atomic checkpoints (`_save_checkpoint`, which also writes the callbacks' state the way the
Trainer's does), engine optimizer files without frozen weights (`_save_optimizer_and_scheduler`,
`_prepare_for_training`), small weight files and file-naming errors on resume
(`_load_from_checkpoint`, `_load_optimizer_and_scheduler`, `_load_rng_state`), and length
grouping from known lengths (`_get_train_sampler`). For each: its signature, that the Trainer
still calls it, and the source of the Trainer's version, reviewed against ours, by hash. A new
release that changes one fails here; re-read the Trainer's method against ours, run
`tools/check_transformers_upgrade.sh` (the exact-resume tests on that release), then add the hash.
"""

from __future__ import annotations

import hashlib
import inspect

import pytest
import torch
import transformers
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers import trainer as trainer_module

from runtime.config import RunConfig
from runtime.trainer import VLMTrainer

# hook -> (its parameters, {sha256[:12] of the Trainer's source: the release it was reviewed on})
PRIVATE_HOOKS = {
    "_get_train_sampler": (["train_dataset"], {"1580d7493244": "5.23.0-5.25.0"}),
    "_save_checkpoint": (["model", "trial"], {"a9111e30faa9": "5.23.0-5.25.0"}),
    "_save_optimizer_and_scheduler": (["output_dir"], {"c5ef974db69a": "5.23.0-5.25.0"}),
    "_prepare_for_training": (
        ["max_steps", "train_dataloader", "resume_from_checkpoint"],
        {"f55950593d7e": "5.23.0", "3b0b65067b69": "5.25.0"},
    ),
    "_load_from_checkpoint": (
        ["resume_from_checkpoint", "model"],
        {"a2804e8d93a2": "5.23.0-5.25.0"},
    ),
    "_load_optimizer_and_scheduler": (["checkpoint"], {"741032f57d6f": "5.23.0-5.25.0"}),
    "_load_rng_state": (["checkpoint"], {"d5ebdfc0a088": "5.23.0-5.25.0"}),
}
# Private helpers `VLMTrainer._save_checkpoint` calls as the Trainer's own version does.
PRIVATE_HELPERS = {
    "_save_rng_state": ["output_dir"],
    "_save_scaler": ["output_dir"],
    "_get_output_dir": ["trial"],
}
PUBLIC_HOOKS = {
    "create_optimizer": ["model"],
    "log": ["logs", "start_time"],
    "save_model": ["output_dir", "_internal_call"],
    "get_batch_samples": ["epoch_iterator", "num_batches", "device"],
    "store_flos": [],
    "get_decay_parameter_names": ["model"],
}


def parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def source_hash(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:12]


@pytest.mark.parametrize("hook", sorted(PRIVATE_HOOKS))
def test_each_private_hook_has_its_reviewed_signature_and_source(hook):
    expected, reviewed = PRIVATE_HOOKS[hook]
    theirs = getattr(Trainer, hook)
    assert parameters(theirs) == expected, f"Trainer.{hook} changed its signature"
    assert parameters(getattr(VLMTrainer, hook)) == expected
    digest = source_hash(theirs)
    assert digest in reviewed, (
        f"transformers {transformers.__version__} changed Trainer.{hook} (source hash {digest}, "
        f"reviewed: {reviewed}): compare it with VLMTrainer.{hook} in runtime/trainer.py, run "
        "tools/check_transformers_upgrade.sh, then add the hash to PRIVATE_HOOKS"
    )


@pytest.mark.parametrize("hook", sorted(PRIVATE_HOOKS))
def test_the_trainer_still_calls_each_private_hook(hook):
    source = inspect.getsource(trainer_module)
    calls = source.count(f"self.{hook}(") + source.count(f"=self.{hook},")  # or passed on
    assert calls >= 1, f"transformers {transformers.__version__} no longer calls Trainer.{hook}"


@pytest.mark.parametrize("table", [PRIVATE_HELPERS, PUBLIC_HOOKS], ids=["helpers", "public"])
def test_helpers_and_public_hooks_keep_their_signatures(table):
    for name, expected in table.items():
        assert parameters(getattr(Trainer, name)) == expected, f"Trainer.{name} changed"


class _Lengths(torch.utils.data.Dataset):
    lengths = [3, 9, 5, 7]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.zeros(self.lengths[index], dtype=torch.long)}


def test_the_dataloader_takes_our_length_grouped_sampler(tmp_path):
    """Behaviour, not only names: the Trainer builds its training loader from our sampler, which
    reads the lengths the dataset knows instead of loading every sample."""
    config = RunConfig()
    config.data.group_by_length = True
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             per_device_train_batch_size=2)  # fmt: skip
    trainer = VLMTrainer(model=nn.Linear(2, 2), args=args, train_dataset=_Lengths(),
                         run_config=config, description={})  # fmt: skip
    seen = []
    ours = trainer._get_train_sampler

    def recording(*args, **kwargs):
        sampler = ours(*args, **kwargs)
        seen.append(sampler)
        return sampler

    trainer._get_train_sampler = recording
    trainer.get_train_dataloader()
    assert len(seen) == 1
    assert type(seen[0]).__name__ == "LengthGroupedSampler"
    assert seen[0].lengths == _Lengths.lengths
