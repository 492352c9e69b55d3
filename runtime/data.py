"""Connects the data configuration to the dataset package, with the facts the model owns.

The dataset receives one `dataset.processor.VLMProcessor` (the tokenizer, `image_token_id` and
the model's `image_processor`, which owns preprocessing and tokens per image) and the image
decoder; it never recomputes a count. With `feature_cache`, the cache is checked
against the model's vision tower and the samples carry its features instead of images; the log
says which of the two the images come from, and a missing --image_folder is an error either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dataset.build import build_supervised_dataset
from dataset.collator import SupervisedCollator
from dataset.packing import PackedCollator, PackedDataset
from dataset.preference import PreferenceCollator, build_preference_dataset
from dataset.processor import VLMProcessor
from model.vlm import VisionLanguageModel
from runtime.config import DataConfig
from visual import load_image
from visual.feature_cache import FeatureCache, check_fixed_grid, tower_cache_settings
from visual.image_io import read_image_size

logger = logging.getLogger(__name__)


def _image_source(config: DataConfig, vlm: VisionLanguageModel) -> FeatureCache | None:
    """Check --image_folder (always) and --feature_cache, and say in the log which one is read."""
    folder = config.image_folder
    if folder is not None and not Path(folder).is_dir():
        raise ValueError(f"--image_folder {folder}: no such directory")
    if not config.feature_cache:
        logger.info("images: decoded from --image_folder %s", folder)
        return None
    check_fixed_grid(vlm.image_processor)
    feature_cache = FeatureCache(config.feature_cache)
    feature_cache.check_matches(tower_cache_settings(vlm.vision))
    logger.info(
        "images: features read from --feature_cache %s; no image file is opened "
        "(--image_folder %s only confines the records' image paths)",
        config.feature_cache, folder,
    )  # fmt: skip
    return feature_cache


def build_datasets(config: DataConfig, vlm: VisionLanguageModel, tokenizer, objective: str = "sft"):
    """Returns (train dataset, eval dataset or None, collator). Bad records raise here. With the
    `dpo` objective the records are preference pairs, collated as chosen and rejected rows."""
    feature_cache = _image_source(config, vlm)
    processor = VLMProcessor(
        tokenizer, vlm.image_token_id, vlm.image_processor, system_prompt=config.system_prompt
    )
    preference = objective == "dpo"

    def build(path: str):
        builder = build_preference_dataset if preference else build_supervised_dataset
        return builder(
            path,
            processor,
            image_folder=config.image_folder,
            load_image=load_image,
            read_image_size=read_image_size,
            model_max_length=config.model_max_length,
            skip_invalid=config.skip_invalid,
            allow_outside_image_folder=config.allow_outside_image_folder,
            check_images=feature_cache is None,  # with a cache, the images are never opened
            feature_cache=feature_cache,
        )

    train = build(config.data_path)
    evaluation = build(config.eval_data_path) if config.eval_data_path else None
    if preference:
        return train, evaluation, PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    collator = SupervisedCollator(pad_token_id=tokenizer.pad_token_id)
    if not config.packing:
        return train, evaluation, collator
    train = PackedDataset(train, capacity=config.model_max_length)
    if evaluation is not None:
        evaluation = PackedDataset(evaluation, capacity=config.model_max_length)
    logger.info(
        "packing: %d samples in %d rows of <= %d tokens (%.1f%% of the slots filled)",
        len(train.dataset), len(train), config.model_max_length,
        100 * sum(train.lengths) / (len(train) * config.model_max_length),
    )  # fmt: skip
    return train, evaluation, PackedCollator(collator)
