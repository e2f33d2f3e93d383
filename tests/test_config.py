import json

import pytest

from ivl.model import HybridConfig


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (0.25, "AGGGAGGG"),
        (0.5, "AGAGAGAG"),
        (0.125, "AGGGGGGG"),
        (0, "GGGGGGGG"),
        (1, "AAAAAAAA"),
    ],
)
def test_layer_types_from_hybrid_ratio(ratio, expected):
    config = HybridConfig.tiny(num_layers=8, hybrid_ratio=ratio)
    assert "".join(t[0].upper() for t in config.layer_types) == expected


def test_infinitevl_preset_matches_the_paper():
    config = HybridConfig.preset("infinitevl-4b")
    assert config.attention_layers == list(range(0, 36, 4))  # 9 blocks of 1 SWA + 3 GDN
    assert config.window == 8192
    assert (config.linear_num_heads, config.linear_head_k_dim, config.linear_head_v_dim) == (16, 128, 256)


def test_explicit_layer_types_win():
    config = HybridConfig.tiny(layer_types=["gated_deltanet", "attention", "attention", "gated_deltanet"])
    assert config.attention_layers == [1, 2]
    assert config.hybrid_ratio == 0.5


def test_round_trip(tmp_path):
    config = HybridConfig.tiny(window=None)
    config.save(tmp_path / "config.json")
    assert HybridConfig.from_file(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(layer_types=["attention", "mamba", "attention", "attention"]), r"layer_types\[1\] = 'mamba'"),
        (dict(layer_types=["attention"]), "num_layers is 4"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(mrope_section=[2, 2, 2]), "must sum to head_dim / 2"),
        (dict(hybrid_ratio=2.0), "hybrid_ratio must be in"),
        (dict(window=0), "window must be"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        HybridConfig.tiny(**overrides)


def test_bad_file_names_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 64,\n  "window": ,\n}')
    with pytest.raises(ValueError, match="config.json:3"):
        HybridConfig.from_file(path)
    path.write_text('{"hidden_sise": 64}')
    with pytest.raises(ValueError, match="hidden_sise"):
        HybridConfig.from_file(path)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        HybridConfig.preset("huge")


OLD_NAMES = {"gdn_num_heads": 2, "gdn_head_k_dim": 16, "gdn_head_v_dim": 32, "gdn_conv_size": 4}
NEW_NAMES = {"linear_num_heads": 2, "linear_head_k_dim": 16, "linear_head_v_dim": 32, "linear_conv_size": 4}


def _one_line_per_old_name(record) -> None:
    lines = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert len(lines) == len(OLD_NAMES) and all("\n" not in line for line in lines)
    for old, line in zip(OLD_NAMES, lines):
        assert f"'{old}' is renamed 'linear_{old.removeprefix('gdn_')}'" in line


def test_old_field_names_still_load_and_name_the_new_ones(tmp_path):
    """Configs written before the linear-mixer sizes were renamed from gdn_*: as keyword arguments and as a
    config.json, each old name gives one line naming its new one, and the config is the new-named one."""
    new = HybridConfig.tiny(**NEW_NAMES)
    with pytest.warns(FutureWarning) as record:
        assert HybridConfig.tiny(**OLD_NAMES) == new
    _one_line_per_old_name(record)

    data = {k: v for k, v in new.to_dict().items() if k not in NEW_NAMES} | OLD_NAMES
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.warns(FutureWarning) as record:
        assert HybridConfig.from_file(tmp_path / "config.json") == new
    _one_line_per_old_name(record)
    with pytest.raises(ValueError, match="both 'gdn_num_heads' and 'linear_num_heads'"):
        HybridConfig.tiny(gdn_num_heads=2, linear_num_heads=2)


def test_a_checkpoint_folder_saved_with_old_names_loads(tmp_path):
    import torch

    from ivl.model import HybridLM, checkpoint

    lm = HybridLM(HybridConfig.tiny())
    checkpoint.save(lm, {"text": lm.config.to_dict()}, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for old, new in zip(OLD_NAMES, NEW_NAMES):
        saved["text"][old] = saved["text"].pop(new)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.warns(FutureWarning) as record:
        config, _ = checkpoint.read_config(tmp_path)
    _one_line_per_old_name(record)
    assert all("config.json" in str(w.message) for w in record)
    fresh = HybridLM(HybridConfig.from_dict(config["text"]))
    assert fresh.config == lm.config
    checkpoint.load_into(fresh, tmp_path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), lm(ids), rtol=0, atol=0)
