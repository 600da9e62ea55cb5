import json

import pytest

from compress.core.config import FLAGS, CompressConfig, TargetSize
from compress.errors import ConfigError
from distill import DistillConfig
from quant.quantize import PRESETS


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
    config = CompressConfig.from_dict({"teacher": "x", "target_size": "50%", "axes": ("hidden", "layers"), "align": 32})
    assert config.prune.axes == ("hidden", "layers") and config.prune.align == 32
    assert CompressConfig.from_dict(config.to_dict()) == config
    assert CompressConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_bf16_by_default_only_where_the_cpu_computes_it(monkeypatch):
    import compress.core.config as config_module

    for native in (True, False):  # emulated bf16 made distillation ~50x slower than fp32 on an AVX2-only CPU
        monkeypatch.setattr(config_module, "cpu_has_bf16", lambda native=native: native)
        assert CompressConfig().bf16 is native and CompressConfig().distill.bf16 is native
        assert CompressConfig.from_dict({"bf16": not native}).distill.bf16 is (not native)  # asked for: kept
        assert CompressConfig.from_dict(CompressConfig().to_dict()).bf16 is native  # a run's config.json: resolved


def test_sections_are_what_the_stages_take():
    config = CompressConfig.from_dict({"distill_lr": 1e-3, "distill_attention": "sdpa", "seed": 3, "bf16": False})
    assert isinstance(config.distill, DistillConfig)
    assert (config.distill.lr, config.distill.attention, config.distill.seed, config.distill.bf16) == (1e-3, "sdpa", 3, False)
    assert (config.distill.tokens, config.distill.kl_weight, config.distill.ce_weight) == (200_000, 0.5, 0.5)
    assert PRESETS[config.quant.recipe].name == "a16w8"
    # --distill-eval-every alone sets the checkpoint interval too, as the flat config always did.
    assert CompressConfig.from_dict({"distill_eval_every": 5}).distill.checkpoint_every == 5
    assert CompressConfig.from_dict({"distill_eval_every": 5, "distill_checkpoint_every": 0}).distill.checkpoint_every == 0


def test_flat_config_files_of_earlier_runs_are_read_like_the_nested_ones():
    flat = {"teacher": "smollm2-135m", "target_size": "0.67x", "axes": ["heads", "mlp"], "eval_samples": 16,
            "eval_data": ["notes.txt"], "distill_tokens": 5000, "distill_kl_weight": 1.0, "distill_ce_weight": 0.0,
            "teacher_correction_tokens": 100, "quant": "a8w8", "quant_transforms": ["rotate"], "seq_len": 128,
            "npu_profile": "generic-a8w8", "quant_decode_calib_tokens": 64}
    config = CompressConfig.from_dict(flat)
    assert config.prune.axes == ("heads", "mlp") and config.eval.samples == 16 and config.eval.data == ("notes.txt",)
    assert config.distill.tokens == 5000 and config.distill.kl_weight == 1.0 and config.correction.tokens == 100
    assert (config.quant.recipe, config.quant.transforms, config.quant.seq_len) == ("a8w8", ("rotate",), 128)
    assert config.quant.npu_profile == "generic-a8w8" and config.quant.decode_calib_tokens == 64
    nested = {"distill": {"tokens": 5000}, "quant": {"recipe": "a8w8"}}
    assert CompressConfig.from_dict(nested) == CompressConfig.from_dict({"distill_tokens": 5000, "quant": "a8w8"})


def test_every_flag_names_one_field():
    assert FLAGS["distill_lr"] == ("distill", "lr") and FLAGS["quant"] == ("quant", "recipe")
    assert FLAGS["axes"] == ("prune", "axes") and FLAGS["seq_len"] == ("quant", "seq_len")
    assert FLAGS["eval_seq_len"] == ("eval", "seq_len") and FLAGS["teacher_correction_lr"] == ("correction", "lr")
    assert "distill_seed" not in FLAGS and "distill_bf16" not in FLAGS  # the run's --seed and --bf16 hold


@pytest.mark.parametrize(
    "field, value, flag",
    [("axes", ("width",), "--axes"), ("align", 48, "--align"), ("importance", "taylor", "--importance"),
     ("stop_after", "ship", "--stop-after"), ("tolerance", 2.0, "--tolerance"), ("calib_samples", 0, "--calib-samples"),
     ("distill_kl_weight", -1.0, "--distill-kl-weight"), ("distill_optimizer", "sgd", "--distill-"),
     ("seq_len", 0, "--seq-len"), ("eval_samples", 0, "--eval-samples")],
)
def test_bad_fields_name_their_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        CompressConfig.from_dict({field: value})


def test_unknown_config_fields_are_named():
    with pytest.raises(ConfigError, match="colour"):
        CompressConfig.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="colour.*distill"):
        CompressConfig.from_dict({"distill": {"colour": "red"}})


def test_fingerprint_depends_only_on_named_fields():
    a, b = CompressConfig(seed=1), CompressConfig(seed=2)
    assert a.fingerprint("target_size") == b.fingerprint("target_size")
    assert a.fingerprint("seed") != b.fingerprint("seed")
    c = CompressConfig.from_dict({"distill_lr": 1e-3})
    assert c.fingerprint("prune", "quant.recipe") == a.fingerprint("prune", "quant.recipe")
    assert c.fingerprint("distill") != a.fingerprint("distill")


def test_quant_settings_resolve_their_defaults_and_refuse_unknown_values():
    from compress.core.config import DEFAULT_TRANSFORMS

    assert CompressConfig.from_dict({"quant": "a8w8"}).quant.transforms == DEFAULT_TRANSFORMS["a8w8"]
    assert CompressConfig().quant.transforms == ("rotate", "embed-rows")  # the massive activation
    assert CompressConfig.from_dict({"quant_transforms": ()}).quant.transforms == ()
    for bad in ({"quant": "int4"}, {"npu_profile": "hexagon"}, {"quant_transforms": ("hadamard",)}, {"seq_len": 0}):
        with pytest.raises(ConfigError):
            CompressConfig.from_dict(bad)


def test_int4_npu_recipe_needs_a_profile_that_takes_int4_and_lpbq_blocks():
    from quant.quantize import QuantRecipe

    assert CompressConfig.from_dict({"quant": "w4a16"}).quant.transforms == ("rotate", "embed-rows")
    with pytest.raises(ConfigError, match="--npu-profile qnn-htp"):
        CompressConfig.from_dict({"quant": "w4a16", "npu_profile": "generic-a8w8"})
    with pytest.raises(ConfigError, match="keep embed-rows"):
        CompressConfig.from_dict({"quant": "w4a16", "npu_profile": "qnn-htp", "quant_transforms": ("rotate",)})
    assert CompressConfig.from_dict({"quant": "w4a16", "quant_qat_tokens": 4096}).quant.qat_tokens == 4096
    with pytest.raises(ConfigError, match="use --quant w4a16"):
        CompressConfig.from_dict({"quant": "a16w8", "quant_qat_tokens": 4096})
    with pytest.raises(ConfigError, match="use at least 1024"):
        CompressConfig.from_dict({"quant": "w4a16", "quant_qat_tokens": 1000})
    with pytest.raises(ConfigError, match="--quant-qat-lr positive"):
        CompressConfig.from_dict({"quant": "w4a16", "quant_qat_lr": 0.0})
    with pytest.raises(ConfigError, match="--quant-qat-unit-lr and --quant-qat-table-lr >= 0"):
        CompressConfig.from_dict({"quant": "w4a16", "quant_qat_unit_lr": -1e-3})
    with pytest.raises(ConfigError, match="--quant-qat-table-lr >= 0"):
        CompressConfig.from_dict({"quant": "w4a16", "quant_qat_table_lr": -1e-3})
    assert CompressConfig.from_dict({"quant": "w4a16", "quant_qat_unit_lr": 0}).quant.qat_unit_lr == 0
    # The table trains on one int4 grid: w4a16's int8 rows (8,192 by default) must be given up for it.
    with pytest.raises(ConfigError, match="keeps 8192 of its rows in int8: add --quant-table-int8-rows 0"):
        CompressConfig.from_dict({"quant": "w4a16", "quant_qat_table_lr": 1e-3})
    one_table = CompressConfig.from_dict({"quant": "w4a16", "quant_qat_table_lr": 1e-3, "quant_table_int8_rows": 0})
    assert one_table.quant.qat_table_lr == 1e-3 and one_table.quant.recipe_used().embedding_wide_rows == 0
    assert CompressConfig.from_dict({"quant": "w4a16"}).quant.recipe_used() == PRESETS["w4a16"]
    assert CompressConfig.from_dict({"quant": "w4a16", "quant_table_int8_rows": 2048}).quant.recipe_used().embedding_wide_rows == 2048
    for bad in ({"quant": "a16w8", "quant_table_int8_rows": 2048}, {"quant": "w4a16", "quant_table_int8_rows": -1}):
        with pytest.raises(ConfigError, match="rows of an int4 embedding table, which --quant w4a16 stores"):
            CompressConfig.from_dict(bad)
    assert CompressConfig.from_dict({"quant": "w4a16", "quant_gptq_samples": 64}).quant.gptq_samples == 64
    with pytest.raises(ConfigError, match="quant-gptq-samples"):
        CompressConfig.from_dict({"quant": "w4a16", "quant_gptq_samples": 0})
    with pytest.raises(ValueError, match="weight_block"):
        QuantRecipe("w4-per-channel", activation_bits=16, weight_bits=4, weight_rounding="gptq")
