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
    assert (config.gdn_num_heads, config.gdn_head_k_dim, config.gdn_head_v_dim) == (16, 128, 256)


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
