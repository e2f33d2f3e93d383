"""The public InfiniteVL release's checkpoint format (``ivl.model.release``, ``python -m ivl.convert --from-release``
/ ``--to-release``) on a tiny random folder written here from the release's own description: its config.json keys
(infinitevl/*/config.json of hustvl/InfiniteVL, at small sizes) and the parameter names and shapes its modelling code
registers for that config, spelled out below rather than taken from the code under test."""

import json
import re
import shutil
from pathlib import Path

import openai
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ivl.data.processing import Processor
from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig, checkpoint
from ivl.model.release import config_from_release, config_to_release, from_release, to_release
from ivl.serve.launch import running_server
from ivl.serve.loading import TINY_VISION

# The published config.json with the sizes made small; the fields it leaves to the release's defaults (layer_types,
# norm_eps) stay out, the linear-attention sizes it leaves out are given at small sizes.
RELEASE_CONFIG = {
    "attn_implementation": "flash_attention_2",
    "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
    "auto_map": {
        "AutoConfig": "configuration_infinitevl.InfiniteVLConfig",
        "AutoModel": "modeling_infinitevl.InfiniteVLQwen2_5_VLForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_infinitevl.InfiniteVLQwen2_5_VLForConditionalGeneration",
        "AutoProcessor": "Qwen2_5_VLProcessor",
    },
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 64,
    "head_dim": 16,
    "image_token_id": 151655,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "infinite_vl",
    "num_attention_heads": 4,
    "num_hidden_layers": 6,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
    "rope_theta": 1000000.0,
    "sliding_window": 16,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0",
    "use_cache": False,
    "use_sliding_window": True,
    "video_token_id": 151656,
    "vision_config": {
        "depth": 2,
        "fullatt_block_indexes": [1],
        "hidden_act": "silu",
        "hidden_size": 32,
        "in_channels": 3,
        "in_chans": 3,
        "intermediate_size": 48,
        "model_type": "infinite_vl",
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "torch_dtype": "bfloat16",
        "window_size": 112,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
    "vision_token_id": 151654,
    "vocab_size": 151936,
    "num_linear_heads": 2,
    "num_linear_key_value_heads": 2,
    "linear_head_dim": 16,
    "expand_v": 2,
    "conv_size": 4,
}
# The release's default layer placement (its InfiniteVLTextConfig): attention opens every block of four.
RELEASE_LAYER_TYPES = [
    "sliding_attention",
    "linear_attention",
    "linear_attention",
    "linear_attention",
    "sliding_attention",
    "linear_attention",
]


def release_shapes(c: dict) -> dict[str, tuple]:
    """Every tensor the release's model of config ``c`` registers, as its files name them (model.*, visual.*), and its
    shape: Qwen2.5-VL's attention (q/k/v biases) and vision tower, fla's Gated DeltaNet with expand_v-wide values."""
    H, Im, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = H // nh
    Hl, dk, K = c["num_linear_heads"], c["linear_head_dim"], c["conv_size"]
    dv = int(dk * c["expand_v"])
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i, kind in enumerate(c.get("layer_types") or RELEASE_LAYER_TYPES):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "mlp.gate_proj.weight": (Im, H),
            p + "mlp.up_proj.weight": (Im, H),
            p + "mlp.down_proj.weight": (H, Im),
        }
        if kind == "linear_attention":
            shapes |= {
                a + "A_log": (Hl,),
                a + "dt_bias": (Hl,),
                a + "q_proj.weight": (Hl * dk, H),
                a + "k_proj.weight": (Hl * dk, H),
                a + "v_proj.weight": (Hl * dv, H),
                a + "a_proj.weight": (Hl, H),
                a + "b_proj.weight": (Hl, H),
                a + "q_conv1d.weight": (Hl * dk, 1, K),
                a + "k_conv1d.weight": (Hl * dk, 1, K),
                a + "v_conv1d.weight": (Hl * dv, 1, K),
                a + "g_proj.weight": (Hl * dv, H),
                a + "o_norm.weight": (dv,),
                a + "o_proj.weight": (H, Hl * dv),
            }
        else:
            shapes |= {
                a + "q_proj.weight": (nh * hd, H),
                a + "q_proj.bias": (nh * hd,),
                a + "k_proj.weight": (nkv * hd, H),
                a + "k_proj.bias": (nkv * hd,),
                a + "v_proj.weight": (nkv * hd, H),
                a + "v_proj.bias": (nkv * hd,),
                a + "o_proj.weight": (H, nh * hd),
            }
    v = {"patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, **c["vision_config"]}  # its defaults
    Hv, Iv, merged = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    shapes["visual.patch_embed.proj.weight"] = (Hv, 3, v["temporal_patch_size"], v["patch_size"], v["patch_size"])
    for j in range(v["depth"]):
        b = f"visual.blocks.{j}."
        shapes |= {
            b + "norm1.weight": (Hv,),
            b + "norm2.weight": (Hv,),
            b + "attn.qkv.weight": (3 * Hv, Hv),
            b + "attn.qkv.bias": (3 * Hv,),
            b + "attn.proj.weight": (Hv, Hv),
            b + "attn.proj.bias": (Hv,),
            b + "mlp.gate_proj.weight": (Iv, Hv),
            b + "mlp.gate_proj.bias": (Iv,),
            b + "mlp.up_proj.weight": (Iv, Hv),
            b + "mlp.up_proj.bias": (Iv,),
            b + "mlp.down_proj.weight": (Hv, Iv),
            b + "mlp.down_proj.bias": (Hv,),
        }
    shapes |= {
        "visual.merger.ln_q.weight": (Hv,),
        "visual.merger.mlp.0.weight": (merged, merged),
        "visual.merger.mlp.0.bias": (merged,),
        "visual.merger.mlp.2.weight": (H, merged),
        "visual.merger.mlp.2.bias": (H,),
    }
    return shapes


def ivl_name(name: str) -> str:
    """The mapping as the release's and ivl's module trees give it (either release layout)."""
    name = re.sub(r"^(model\.)?visual\.", "visual.", name)
    name = re.sub(r"^model\.(language_model\.)?", "lm.", name)
    name = re.sub(r"^lm_head\.", "lm.lm_head.", name)
    for theirs, ours in (
        (".input_layernorm.", ".mixer_norm."),
        (".post_attention_layernorm.", ".mlp_norm."),
        (".self_attn.", ".mixer."),
    ):
        name = name.replace(theirs, ours)
    return name


def in_memory_layout(name: str) -> str:
    """The release model's own state-dict names (transformers >= 4.52): model.language_model.*, model.visual.*."""
    return re.sub(r"^model\.", "model.language_model.", name) if name.startswith("model.") else "model." + name


def random_release_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator).to(torch.bfloat16)
        for name, shape in release_shapes(config).items()
    }


RELEASE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_release(folder, config=RELEASE_CONFIG, state=None, processor=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if state is not None:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if processor:  # Qwen2.5-VL's processor files: its tokenizer (the bundled one), image and generation settings
        Processor.from_pretrained().save_pretrained(folder)
        # the release's own chat template and tokenizer settings, unlike ivl's bundled ones: copied, not rewritten
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 12345}))
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": RELEASE_CHAT_TEMPLATE}))
        (folder / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "min_pixels": 3136,
                    "max_pixels": 12845056,
                    "patch_size": 14,
                    "temporal_patch_size": 2,
                    "merge_size": 2,
                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711],
                    "image_processor_type": "Qwen2VLImageProcessor",
                    "processor_class": "Qwen2_5_VLProcessor",
                },
                indent=2,
            )
        )
        (folder / "generation_config.json").write_text(
            json.dumps(
                {
                    "bos_token_id": 151643,
                    "pad_token_id": 151643,
                    "eos_token_id": [151645, 151643],
                    "do_sample": True,
                    "repetition_penalty": 1.05,
                    "temperature": 0.1,
                    "top_p": 0.001,
                    "top_k": 1,
                },
                indent=2,
            )
        )
    return folder


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-format folder (legacy file layout, tied head left out, as save_pretrained writes it) and its ivl
    conversion."""
    root = tmp_path_factory.mktemp("release")
    state = random_release_state(RELEASE_CONFIG)
    folder = write_release(root / "release", state=state)
    written = from_release(folder, root / "ivl")
    return {"folder": folder, "state": state, "ivl": root / "ivl", "written": written}


def read(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


# ---- release -> ivl ----------------------------------------------------------------------------------------------


def test_every_release_tensor_lands_in_ivl_unchanged(release):
    ours = read(release["ivl"])
    assert set(ours) == {ivl_name(name) for name in release["state"]}
    for name, tensor in release["state"].items():
        assert ours[ivl_name(name)].dtype == torch.bfloat16
        assert torch.equal(ours[ivl_name(name)], tensor), name
    model = InfiniteVL.from_pretrained(release["ivl"])  # every tensor of the model from the folder (strict)
    state = model.state_dict()
    for name, tensor in release["state"].items():
        assert torch.equal(state[ivl_name(name)], tensor), name
    assert torch.equal(state["lm.lm_head.weight"], release["state"]["model.embed_tokens.weight"])  # tied


def test_names_and_shapes_agree_with_what_the_release_config_implies(release):
    """ivl's model of the converted config has exactly the release's tensors, of the release's shapes."""
    model = InfiniteVL.from_pretrained(release["ivl"])
    tied = checkpoint.tied_names(model)
    ours = {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in tied}
    assert ours == {ivl_name(n): shape for n, shape in release_shapes(RELEASE_CONFIG).items()}


def test_the_config_maps_field_by_field(release):
    config = InfiniteVLConfig.from_dict(checkpoint.read_config(release["ivl"])[0])
    t = config.text
    assert t.layer_types == [
        "attention",
        "gated_deltanet",
        "gated_deltanet",
        "gated_deltanet",
        "attention",
        "gated_deltanet",
    ]  # the release's default placement, config.json giving none
    assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_layers) == (151936, 64, 96, 6)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.attention_bias) == (4, 2, 16, True)
    assert (t.window, t.rope_theta, t.mrope_section) == (16, 1e6, [2, 3, 3])
    assert (t.linear_num_heads, t.linear_head_k_dim, t.linear_head_v_dim, t.linear_conv_size) == (2, 16, 32, 4)
    assert (t.rms_norm_eps, t.linear_norm_eps, t.tie_word_embeddings) == (1e-6, 1e-5, True)
    assert config.vision == {
        k: v for k, v in RELEASE_CONFIG["vision_config"].items() if k not in ("model_type", "torch_dtype")
    }
    assert config.tokens_per_second == 2
    assert (config.image_token_id, config.video_token_id, config.vision_start_token_id) == (151655, 151656, 151652)
    assert (config.eos_token_ids, config.pad_token_id) == ([151645, 151643], 151643)
    assert json.loads((release["ivl"] / "release_config.json").read_text()) == RELEASE_CONFIG


def test_the_window_follows_use_sliding_window_and_the_layer_types():
    full = config_from_release({**RELEASE_CONFIG, "use_sliding_window": False})
    assert full.text.window is None
    types = ["full_attention" if t == "sliding_attention" else t for t in RELEASE_LAYER_TYPES]
    assert config_from_release({**RELEASE_CONFIG, "layer_types": types}).text.window is None
    assert config_from_release({**RELEASE_CONFIG, "layer_types": RELEASE_LAYER_TYPES}).text.window == 16


def test_the_processor_files_are_copied_unchanged(release):
    names = [p.name for p in release["folder"].iterdir() if p.name not in ("config.json", "model.safetensors")]
    assert {"tokenizer_config.json", "preprocessor_config.json", "generation_config.json"} <= set(names)
    for name in names:
        assert (release["ivl"] / name).read_bytes() == (release["folder"] / name).read_bytes(), name
        assert name in release["written"]
    processor = Processor.from_pretrained(release["ivl"])
    assert processor.image_size["longest_edge"] == 12845056 and processor.tokenizer.model_max_length == 12345


def test_linear_norm_eps_is_the_release_norm_eps_in_the_gated_deltanet_output_norm(release):
    model = InfiniteVL.from_pretrained(release["ivl"])
    for block in model.lm.layers:
        assert block.mixer_norm.eps == 1e-6
        if block.layer_type == "gated_deltanet":
            assert block.mixer.o_norm.eps == 1e-5 and block.mixer.step_sizes().eps == 1e-5
    # Unset, it is rms_norm_eps: ivl's own checkpoints compute as before.
    plain = InfiniteVL(
        InfiniteVLConfig(text=HybridConfig.tiny(vocab_size=151936, rms_norm_eps=3e-6), vision=TINY_VISION)
    )
    assert all(b.mixer.o_norm.eps == 3e-6 for b in plain.lm.layers if b.layer_type == "gated_deltanet")


def test_the_in_memory_layout_and_a_stored_tied_head_read_the_same(release, tmp_path):
    state = {in_memory_layout(n): t for n, t in release["state"].items()}
    state["lm_head.weight"] = release["state"]["model.embed_tokens.weight"].clone()
    folder = write_release(tmp_path / "release", state=state, processor=False)
    from_release(folder, tmp_path / "ivl")
    assert read(tmp_path / "ivl").keys() == read(release["ivl"]).keys()
    assert all(torch.equal(t, read(release["ivl"])[n]) for n, t in read(tmp_path / "ivl").items())
    assert checkpoint.has_tokenizer(tmp_path / "ivl")  # none given: the bundled Qwen2.5 tokenizer

    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"'lm_head.weight' differs from the embeddings"):
        from_release(folder, tmp_path / "ivl2")


# ---- ivl -> release -> ivl ---------------------------------------------------------------------------------------


def random_ivl_model(**text) -> InfiniteVL:
    model = InfiniteVL(InfiniteVLConfig(text=HybridConfig.tiny(vocab_size=151936, **text), vision=TINY_VISION))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "text",
    [
        {},
        dict(
            window=None,
            tie_word_embeddings=False,
            linear_norm_eps=1e-5,
            layer_types=["gated_deltanet", "attention", "attention", "gated_deltanet"],
        ),
    ],
)
def test_ivl_to_release_to_ivl_is_bit_identical(text, tmp_path):
    random_ivl_model(**text).save_pretrained(tmp_path / "ivl")
    to_release(tmp_path / "ivl", tmp_path / "release")
    from_release(tmp_path / "release", tmp_path / "back")
    before, after = checkpoint.read_config(tmp_path / "ivl")[0], checkpoint.read_config(tmp_path / "back")[0]
    for config in (before, after):  # the Mamba2 head width: no field in the release, nothing in a model without Mamba2
        config["text"].pop("mamba2_head_dim")
    assert after == before
    before, after = checkpoint.read_state(tmp_path / "ivl"), checkpoint.read_state(tmp_path / "back")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before)

    # the release folder as the release's code reads it
    written = json.loads((tmp_path / "release" / "config.json").read_text())
    assert {k: written[k] for k in ("model_type", "architectures", "auto_map")} == {
        k: RELEASE_CONFIG[k] for k in ("model_type", "architectures", "auto_map")
    }
    config = InfiniteVLConfig.from_dict(checkpoint.read_config(tmp_path / "ivl")[0])
    attention = "sliding_attention" if config.text.window else "full_attention"
    assert written["layer_types"] == [
        attention if t == "attention" else "linear_attention" for t in config.text.layer_types
    ]
    assert written["norm_eps"] == text.get("linear_norm_eps", 1e-6)  # else the block norms' epsilon, tiny's 1e-6
    implied = {in_memory_layout(n): shape for n, shape in release_shapes(written).items()}
    if not written["tie_word_embeddings"]:
        implied["lm_head.weight"] = implied["model.language_model.embed_tokens.weight"]
    assert {n: tuple(t.shape) for n, t in read(tmp_path / "release").items()} == implied


def test_release_to_ivl_to_release_keeps_every_tensor_and_field(release, tmp_path):
    to_release(release["ivl"], tmp_path / "release")
    state = {in_memory_layout(n): t for n, t in release["state"].items()}  # written under the module names
    assert read(tmp_path / "release").keys() == state.keys()
    assert all(torch.equal(t, state[n]) for n, t in read(tmp_path / "release").items())
    written = json.loads((tmp_path / "release" / "config.json").read_text())
    assert {k: written[k] for k in RELEASE_CONFIG} == RELEASE_CONFIG  # unused fields back as they were
    assert (written["layer_types"], written["norm_eps"]) == (RELEASE_LAYER_TYPES, 1e-5)  # the defaults, spelled out
    for name in ("tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (tmp_path / "release" / name).read_bytes() == (release["folder"] / name).read_bytes()


# ---- refusals: one line, naming the file and the field -----------------------------------------------------------


def test_a_config_without_the_model_sizes_is_refused_by_field(tmp_path):
    for size in ("num_hidden_layers", "hidden_size"):
        config = {k: v for k, v in RELEASE_CONFIG.items() if k != size}
        with pytest.raises(ValueError, match=rf"^config.json: {size} is missing"):
            config_from_release(config)


def test_a_config_saved_with_a_text_config_and_rope_parameters_reads_the_same():
    """A config.json the release's config class wrote back under transformers 5: the text fields nested, the rope
    settings as rope_parameters."""
    nested = {k: v for k, v in RELEASE_CONFIG.items() if k in ("model_type", "vision_config", "image_token_id")}
    text = {k: v for k, v in RELEASE_CONFIG.items() if k not in nested and k not in ("rope_theta", "rope_scaling")}
    text["rope_parameters"] = {**RELEASE_CONFIG["rope_scaling"], "rope_theta": 5e5}
    read = config_from_release({**nested, "text_config": text})
    assert read == config_from_release({**RELEASE_CONFIG, "rope_theta": 5e5}) and read.text.rope_theta == 5e5


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_linear_key_value_heads": 1}, "num_linear_key_value_heads"),
        ({"use_gate": False}, "use_gate"),
        ({"use_short_conv": False}, "use_short_conv"),
        ({"layer_types": [*RELEASE_LAYER_TYPES[:2], "mamba", *RELEASE_LAYER_TYPES[3:]]}, "layer_types[2]"),
        ({"layer_types": ["full_attention", *RELEASE_LAYER_TYPES[1:]]}, "layer_types"),
        ({"head_dim": 32}, "head_dim"),
        ({"expand_v": 1.3}, "expand_v"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "default"}}, "rope_scaling.mrope_section"),
        ({"model_type": "qwen2_5_vl"}, "model_type"),
    ],
)
def test_what_cannot_be_mapped_is_refused_by_field(change, field, tmp_path):
    folder = write_release(tmp_path / "release", {**RELEASE_CONFIG, **change}, processor=False)
    with pytest.raises(ValueError) as err:
        from_release(folder, tmp_path / "ivl")
    message = str(err.value)
    assert message.startswith(f"{folder / 'config.json'}: {field} ") and "\n" not in message
    assert not (tmp_path / "ivl").exists()


@pytest.mark.parametrize(
    "edit, says",
    [
        (
            lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}),
            "'model.layers.0.self_attn.q_norm.weight' has no place",
        ),
        (
            lambda s: s.update({"model.layers.1.self_attn.o_norm.weight": torch.ones(16)}),
            "'model.layers.1.self_attn.o_norm.weight' has shape (16,); its config implies (32,)",
        ),
        (lambda s: s.pop("model.layers.1.self_attn.A_log"), "missing, e.g. ['model.layers.1.self_attn.A_log']"),
        (lambda s: s.update({"decoder.weight": torch.ones(1)}), "'decoder.weight' is not one of the release's"),
    ],
)
def test_tensors_that_do_not_fit_the_config_are_refused_by_name(edit, says, release, tmp_path):
    state = dict(release["state"])
    edit(state)
    folder = write_release(tmp_path / "release", state=state, processor=False)
    with pytest.raises(ValueError, match=re.escape(says)):
        from_release(folder, tmp_path / "ivl")


@pytest.mark.parametrize(
    "text, field",
    [
        (
            dict(layer_types=["attention", "mamba2", "gated_deltanet", "gated_deltanet"]),
            "text.layer_types[1] = 'mamba2'",
        ),
        (dict(layer_types=["attention", "gated_deltanet", "gla", "gated_deltanet"]), "text.layer_types[2] = 'gla'"),
        (dict(num_attention_heads=2, num_key_value_heads=2), "text.head_dim"),
        (dict(attention_bias=False), "text.attention_bias"),
    ],
)
def test_what_the_release_cannot_hold_is_refused_by_field(text, field, tmp_path):
    config = InfiniteVLConfig(text=HybridConfig.tiny(vocab_size=151936, **text), vision=TINY_VISION)
    with pytest.raises(ValueError) as err:
        config_to_release(config, where="ivl/config.json")
    assert str(err.value).startswith(f"ivl/config.json: {field}") and "\n" not in str(err.value)


# ---- the command line and the server -----------------------------------------------------------------------------


def test_the_command_line_converts_both_ways_and_refuses_in_one_line(release, tmp_path, capsys):
    from ivl.convert import main

    main(["--to-release", str(release["ivl"]), "--out", str(tmp_path / "release")])
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'release'}: ") and "config.json" in out and "model.safetensors" in out
    main(["--from-release", str(tmp_path / "release"), "--out", str(tmp_path / "ivl")])
    assert "model.safetensors" in capsys.readouterr().out
    write_release(tmp_path / "bad", {**RELEASE_CONFIG, "use_gate": False}, processor=False)
    for argv, says in (
        (["--from-release", str(tmp_path / "bad"), "--out", str(tmp_path / "x")], "config.json: use_gate is false"),
        (
            ["--from-release", str(tmp_path / "release"), "--out", str(tmp_path / "x"), "--dtype", "float32"],
            "--dtype: only with --teacher",
        ),
        (["--to-release", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "no config.json there"),
        (["--to-release", str(tmp_path / "release"), "--out", str(tmp_path / "x")], "(--from-release reads it"),
        (["--from-release", str(tmp_path / "ivl"), "--out", str(tmp_path / "x")], "already an ivl folder"),
        (["--teacher", "t", "--from-release", "r", "--out", "x"], "not allowed with argument"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert says in error, error


def test_a_converted_release_folder_serves(release, tmp_path):
    """``python lightning_app.py --model DIR`` on the converted folder, with the release's tokenizer and processor
    files: a chat completion through the OpenAI client."""
    model = shutil.copytree(release["ivl"], tmp_path / "infinitevl")
    with running_server(
        "--model",
        str(model),
        "--max-context",
        "512",
        log_path=tmp_path / "server.log",
        env={"OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        entry=(str(Path(__file__).resolve().parents[1] / "lightning_app.py"),),
    ) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["infinitevl"]
        reply = client.chat.completions.create(
            model="infinitevl", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert 1 <= reply.usage.completion_tokens <= 4 and reply.usage.prompt_tokens > 1
    lines = (tmp_path / "server.log").read_text().splitlines()
    assert any(line.startswith(f"serving {model.resolve()}") for line in lines)
