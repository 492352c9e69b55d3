"""Connects the data configuration to the dataset package, with the facts the model owns.

The dataset receives ints (`image_token_id`, tokens per image) and callables (the tower's image
loader and preprocessor); it never recomputes them.
"""

from __future__ import annotations

from dataset.build import build_supervised_dataset
from dataset.collator import SupervisedCollator
from model.config import DataConfig
from model.vlm import VisionLanguageModel
from visual import load_image


def build_datasets(config: DataConfig, vlm: VisionLanguageModel, tokenizer):
    """Returns (train dataset, eval dataset or None, collator). Bad records raise here."""

    def build(path: str):
        return build_supervised_dataset(
            path,
            tokenizer,
            image_folder=config.image_folder,
            load_image=load_image,
            preprocess=vlm.vision.preprocessor,  # light object: cheap to send to workers
            image_token_id=vlm.image_token_id,
            num_image_tokens=vlm.num_image_tokens,
            model_max_length=config.model_max_length,
            system_prompt=config.system_prompt,
            skip_invalid=config.skip_invalid,
        )

    train = build(config.data_path)
    evaluation = build(config.eval_data_path) if config.eval_data_path else None
    return train, evaluation, SupervisedCollator(pad_token_id=tokenizer.pad_token_id)
