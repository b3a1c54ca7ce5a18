"""RankerConfig: the paper's presets, scaling, (de)serialization and clear errors for configs that cannot work."""

import json

import pytest
import yaml

import tfrs_clippy_models as models
from tfrs_clippy.data.spec import DatasetSpec
from tfrs_clippy_models import RankerConfig


def test_presets_have_the_papers_shapes():
    small, large, large_dcn = (RankerConfig.preset(name) for name in ("small", "large", "large_dcn"))
    assert (small.bottom, small.bottom_units, small.cross_layers) == ("shared_bottom", (512, 512), 0)
    assert (large.bottom, large.bottom_units, large.cross_layers) == ("shared_bottom", (4096,) * 4, 0)
    assert (large_dcn.bottom_units, large_dcn.cross_layers, large_dcn.cross_placement) == ((4096,) * 4, 1, "stacked")
    assert large_dcn.cross_projection_dim is None  # full rank


def test_scale_multiplies_every_hidden_width_and_keeps_their_ratios():
    small = RankerConfig.preset("small", scale=1 / 8)
    large = RankerConfig.preset("large", scale=1 / 8)
    assert small.scaled(small.bottom_units) == (64, 64)
    assert large.scaled(large.bottom_units) == (512,) * 4
    assert large.scaled(large.tower_units) == (32,)
    assert RankerConfig(scale=1e-6).scaled((512,)) == (1,)


def test_preset_overrides_apply():
    config = RankerConfig.preset("small", bottom="mmoe", num_experts=3)
    assert (config.bottom, config.num_experts, config.bottom_units) == ("mmoe", 3, (512, 512))


def test_dict_round_trip_and_preset_key():
    config = RankerConfig.preset("large_dcn", scale=0.25, task_weights={"click": 2.0}, cross_projection_dim=8)
    as_dict = config.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert RankerConfig.from_dict(as_dict) == config
    preset = RankerConfig.preset("large_dcn", scale=0.25)
    assert RankerConfig.from_dict({"preset": "large_dcn", "scale": 0.25}) == preset
    assert as_dict["output_bias"] == "label_prior"  # the default
    zero = RankerConfig.preset("small", output_bias="zero")
    assert zero.to_dict()["output_bias"] == "zero" and RankerConfig.from_dict(zero.to_dict()) == zero
    # A dict saved before the field existed loads with the default.
    del as_dict["output_bias"]
    assert RankerConfig.from_dict(as_dict) == config


def test_load_from_yaml_and_json(tmp_path):
    config = RankerConfig(bottom="ple", bottom_units=(16, 8), num_levels=2, task_weights={"rating": 0.1})
    (tmp_path / "ranker.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (tmp_path / "ranker.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "preset.yml").write_text("preset: large\nscale: 0.125\n")
    assert RankerConfig.load(tmp_path / "ranker.yaml") == config
    assert RankerConfig.load(tmp_path / "ranker.json") == config
    assert RankerConfig.load(tmp_path / "preset.yml") == RankerConfig.preset("large", scale=0.125)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bottom": "transformer"}, r"`bottom` must be one of .*'transformer'"),
        ({"bottom": "mmoe", "num_experts": 0}, r"`num_experts` must be an integer >= 1, got 0"),
        ({"bottom": "ple", "num_task_experts": 0}, r"`num_task_experts` must be an integer >= 1, got 0"),
        ({"num_levels": 0}, r"`num_levels` must be an integer >= 1, got 0"),
        ({"bottom_units": (64, -8)}, r"`bottom_units` must be positive integers, got \(64, -8\)"),
        ({"bottom_units": ()}, r"`bottom_units` must name at least one layer"),
        ({"tower_units": (0,)}, r"`tower_units` must be positive integers, got \(0,\)"),
        ({"cross_layers": -1}, r"`cross_layers` must be an integer >= 0, got -1"),
        ({"cross_projection_dim": 0}, r"`cross_projection_dim` must be None or an integer >= 1, got 0"),
        ({"cross_placement": "diagonal"}, r"`cross_placement` must be one of .*'diagonal'"),
        ({"multi_hot_combiner": "max"}, r"`multi_hot_combiner` must be one of .*'max'"),
        ({"output_bias": "mean"}, r"`output_bias` must be one of \('zero', 'label_prior'\), got 'mean'"),
        ({"scale": 0}, r"`scale` must be a finite number > 0, got 0"),
        ({"task_weights": {"click": -1.0}}, r"`task_weights\['click'\]` must be a number >= 0, got -1.0"),
        ({"activation": "wiggle"}, r"unknown `activation` 'wiggle'"),
        ({"kernel_initializer": "twos"}, r"unknown `kernel_initializer` 'twos'"),
        ({"experts": 4}, r"unknown fields \['experts'\]"),
    ],
)
def test_invalid_config_names_the_field_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        RankerConfig.from_dict(overrides)


def test_unknown_preset_and_bad_file_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"`preset` must be one of .*'huge'"):
        RankerConfig.preset("huge")
    (tmp_path / "ranker.toml").write_text("")
    with pytest.raises(ValueError, match=r"must end in .yaml, .yml or .json"):
        RankerConfig.load(tmp_path / "ranker.toml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match=r"must hold a mapping, got list"):
        RankerConfig.load(tmp_path / "list.yaml")


def test_configs_that_do_not_fit_the_spec_are_rejected(tiny_spec):
    with pytest.raises(ValueError, match=r"`task_weights` names tasks \['ctr'\] that the spec lacks"):
        models.build_ranker(tiny_spec, RankerConfig(task_weights={"ctr": 1.0}))
    with pytest.raises(ValueError, match=r"no features"):
        models.build_ranker(DatasetSpec(features=(), tasks=tiny_spec.tasks), "small")
    # An unknown task kind never reaches the model: the spec refuses it.
    spec_dict = tiny_spec.to_dict()
    spec_dict["tasks"][0]["kind"] = "ranking"
    with pytest.raises(ValueError, match=r"TaskSpec 'click': `kind` must be one of .*'ranking'"):
        DatasetSpec.from_dict(spec_dict)
