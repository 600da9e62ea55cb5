import pytest

from compress.config import CompressConfig, TargetSize
from compress.errors import ConfigError


@pytest.mark.parametrize(
    "text, params, ratio",
    [("90M", 90_000_000, None), ("1.2B", 1_200_000_000, None), ("500k", 500_000, None), ("0.67x", None, 0.67), ("67%", None, 0.67)],
)
def test_target_size_parsing(text, params, ratio):
    target = TargetSize.parse(text)
    assert target.params == params
    assert target.ratio == pytest.approx(ratio) if ratio else target.ratio is None


@pytest.mark.parametrize("text", ["big", "-3M", "0x", "", "12 parsecs"])
def test_bad_target_sizes_name_the_flag(text):
    with pytest.raises(ConfigError, match="--target-size"):
        TargetSize.parse(text)


def test_config_round_trips_through_json():
    config = CompressConfig(teacher="x", target_size="50%", axes=("hidden", "layers"), align=32)
    assert CompressConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "field, value, flag",
    [("axes", ("width",), "--axes"), ("align", 48, "--align"), ("importance", "taylor", "--importance"),
     ("stop_after", "ship", "--stop-after"), ("tolerance", 2.0, "--tolerance"), ("calib_samples", 0, "--calib-samples")],
)
def test_bad_fields_name_their_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        CompressConfig(**{field: value})


def test_unknown_config_field_is_named():
    with pytest.raises(ConfigError, match="colour"):
        CompressConfig.from_dict({"colour": "red"})


def test_fingerprint_depends_only_on_named_fields():
    a, b = CompressConfig(seed=1), CompressConfig(seed=2)
    assert a.fingerprint("target_size") == b.fingerprint("target_size")
    assert a.fingerprint("seed") != b.fingerprint("seed")


def test_quant_settings_resolve_their_defaults_and_refuse_unknown_values():
    from compress.config import DEFAULT_TRANSFORMS

    assert CompressConfig(quant="a8w8").quant_transforms == DEFAULT_TRANSFORMS["a8w8"]
    assert CompressConfig(quant="a16w8").quant_transforms == ("rotate", "embed-rows")  # the massive activation
    assert CompressConfig(quant_transforms=()).quant_transforms == ()
    for bad in ({"quant": "int4"}, {"npu_profile": "hexagon"}, {"quant_transforms": ("hadamard",)}, {"seq_len": 0}):
        with pytest.raises(ConfigError):
            CompressConfig(**bad)
