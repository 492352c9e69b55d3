"""The AnyRes settings as config fields and flags: typed, saved, and refused with one line."""

import argparse

import pytest

from runtime.config import add_config_flags, flag_overrides, load_config, save_config


def _flags(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return flag_overrides(parser.parse_args(list(argv)))


def test_anyres_from_yaml_is_saved_and_read_back(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "vision:\n  image_aspect_ratio: anyres\n"
        "  image_grid_pinpoints: [[32, 64], [64, 32]]\n  image_max_tiles: 2\n"
    )
    config = load_config(path)
    assert config.vision.image_grid_pinpoints == [[32, 64], [64, 32]]
    save_config(config, tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again.vision == config.vision


def test_anyres_from_flags():
    overrides = _flags(
        "--image_aspect_ratio", "anyres", "--image_grid_pinpoints", "[[336, 672], [672, 336]]"
    )
    config = load_config(overrides=overrides)
    assert config.vision.image_aspect_ratio == "anyres"
    assert config.vision.image_grid_pinpoints == [[336, 672], [672, 336]]
    assert config.vision.image_max_tiles is None


def test_a_pinpoints_flag_that_is_not_a_list_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        _flags("--image_grid_pinpoints", "336x672")
    assert "--image_grid_pinpoints: expected a list" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_grid_pinpoints": [[32, 64]]}, "--image_grid_pinpoints applies to "),
        ({"image_max_tiles": 2}, "--image_max_tiles applies to --image_aspect_ratio anyres"),
        ({"image_aspect_ratio": "anyres", "image_grid_pinpoints": []}, "is empty"),
        (
            {"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[32, 64, 1]]},
            r"--image_grid_pinpoints: \[32, 64, 1\] is not a \[height, width\] pair",
        ),
        ({"image_aspect_ratio": "anyres", "image_max_tiles": 0}, "--image_max_tiles 0"),
        (
            {"image_aspect_ratio": "anyres", "vision_library": "qwen_vl"},
            "anyres cannot use --vision_library qwen_vl",
        ),
        (
            {"image_aspect_ratio": "anyres", "projector_type": "resampler"},
            "--projector_type resampler cannot be used with --image_aspect_ratio anyres",
        ),
        ({"image_aspect_ratio": "tiles"}, "--image_aspect_ratio 'tiles' is not one of"),
    ],
)
def test_bad_anyres_settings_are_refused_at_start(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_a_yaml_pinpoints_value_of_the_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("vision:\n  image_aspect_ratio: anyres\n  image_grid_pinpoints: 336x672\n")
    with pytest.raises(ValueError, match="image_grid_pinpoints must be list or null"):
        load_config(path)


def test_an_anyres_tower_normalises_tiles_only(tiny_clip_dir):
    from visual import load_vision_tower
    from visual.anyres import AnyResImageProcessor

    tower = load_vision_tower(str(tiny_clip_dir), image_aspect_ratio="anyres")
    assert not tower.preprocessor.pad_to_square
    assert AnyResImageProcessor.from_tower(tower).geometry.tile_size == tower.image_size


def test_a_feature_cache_of_anyres_is_refused_before_reading(tmp_path, capsys):
    from dataprocess.__main__ import main as dataprocess_main

    argv = ["features", "--data", str(tmp_path / "absent.json"), "--image_folder", str(tmp_path)]
    argv += ["--vision_model", "absent", "--image_aspect_ratio", "anyres", "--out", str(tmp_path)]
    assert dataprocess_main(argv) == 2
    assert "--image_aspect_ratio anyres: a feature cache holds one" in capsys.readouterr().err


def test_an_exact_resume_keeps_the_tiling(tmp_path):
    from runtime.resume import TRAIN_CONFIG, check_same_settings

    flags = {"image_aspect_ratio": "anyres", "image_grid_pinpoints": [[32, 64], [64, 32]]}
    save_config(load_config(overrides=flags), tmp_path / TRAIN_CONFIG)
    check_same_settings(load_config(overrides=flags), tmp_path, exact=True)
    other = load_config(overrides={**flags, "image_max_tiles": 1})
    with pytest.raises(ValueError, match="--image_max_tiles is 1 here, None there"):
        check_same_settings(other, tmp_path, exact=True)
    check_same_settings(other, tmp_path, exact=False)  # weights only: a new tiling is fine
