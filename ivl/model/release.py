"""The public InfiniteVL release's checkpoint format (hustvl/InfiniteVL, loaded there with ``trust_remote_code``)
to ivl's checkpoint folders and back.

The release's language model is built from fla's layers, as ivl's is, so the two map one to one: every tensor
keeps its shape and values and only its name changes (``model.layers.{i}.self_attn.*`` is
``lm.layers.{i}.mixer.*``, ``input_layernorm`` is ``mixer_norm``, ...). Its config.json is flat (the text model's
fields at the top level), and its ``"linear_attention"`` layers are Gated DeltaNet (ivl's ``linear_attention`` is
the ungated control). Nothing here imports the release's code.

``from_release`` keeps the release's config.json beside the ivl checkpoint (``release_config.json``), so that
``to_release`` writes back the fields ivl has no use for (``max_window_layers``, ``vision_end_token_id``, ...)
as they were.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch

from ivl.model import checkpoint
from ivl.model.config import MODEL_TYPE, HybridConfig, InfiniteVLConfig
from ivl.model.vision import BOOKKEEPING
from ivl.model.vlm import InfiniteVL

RELEASE_MODEL_TYPE = "infinite_vl"
RELEASE_CONFIG_COPY = "release_config.json"
"""The release's config.json as ``from_release`` found it, kept in the ivl folder for ``to_release``."""

# The release's config.json: what it holds besides the sizes, as published (infinitevl/*/config.json).
RELEASE_TEMPLATE: dict = {
    "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
    "auto_map": {
        "AutoConfig": "configuration_infinitevl.InfiniteVLConfig",
        "AutoModel": "modeling_infinitevl.InfiniteVLQwen2_5_VLForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_infinitevl.InfiniteVLQwen2_5_VLForConditionalGeneration",
        "AutoProcessor": "Qwen2_5_VLProcessor",
    },
    "model_type": RELEASE_MODEL_TYPE,
    "attn_implementation": "flash_attention_2",
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "use_cache": False,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
}

# The release's defaults (its InfiniteVLTextConfig / InfiniteVLConfig) for fields a config.json leaves out. The
# model's sizes have none here: its class defaults are another model's (80 layers of 8192), so a config.json
# without them is refused rather than read as that model.
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
RELEASE_DEFAULTS: dict = {
    "head_dim": 128,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "rope_theta": 1_000_000.0,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "layer_types": None,
    "expand_v": 2,
    "use_gate": True,
    "use_short_conv": True,
    "conv_size": 4,
    "num_linear_key_value_heads": 16,
    "num_linear_heads": 16,
    "linear_head_dim": 128,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
}

_ATTENTION_TYPES = ("sliding_attention", "full_attention")
_GDN_TYPE = "linear_attention"  # the release's name for its Gated DeltaNet layers

# Processor files travel with the weights unchanged (tokenizer, chat template, image and video settings).
PROCESSOR_FILES = (
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)


# ---- config ------------------------------------------------------------------------------------------------------


def config_from_release(release: dict, where: str = "config.json") -> InfiniteVLConfig:
    """ivl's config of a release config.json (flat, or with a ``text_config``); refuses, naming the field, what
    ivl cannot compute as the release does."""

    def refuse(field: str, why: str) -> ValueError:
        return ValueError(f"{where}: {field} {why}")

    model_type = release.get("model_type", RELEASE_MODEL_TYPE)
    if model_type == MODEL_TYPE:
        raise refuse(
            "model_type", f"= {model_type!r}: already an ivl folder (--to-release writes the release's format)"
        )
    if model_type != RELEASE_MODEL_TYPE:
        raise refuse(
            "model_type",
            f"= {model_type!r}, not the release's {RELEASE_MODEL_TYPE!r} (a Qwen2.5-VL "
            "teacher converts with --teacher)",
        )
    text = {**release, **(release.get("text_config") or {})}

    def get(name: str):
        if name in REQUIRED and name not in text:
            raise refuse(name, "is missing (the model's sizes have no default)")
        return text[name] if name in text else RELEASE_DEFAULTS[name]

    num_layers = get("num_hidden_layers")
    release_types = get("layer_types") or [_GDN_TYPE if i % 4 else "sliding_attention" for i in range(num_layers)]
    if len(release_types) != num_layers:
        raise refuse("layer_types", f"has {len(release_types)} entries but num_hidden_layers is {num_layers}")
    for i, kind in enumerate(release_types):
        if kind not in (*_ATTENTION_TYPES, _GDN_TYPE):
            raise refuse(f"layer_types[{i}]", f"= {kind!r}: ivl maps only {[*_ATTENTION_TYPES, _GDN_TYPE]}")
    layer_types = ["gated_deltanet" if kind == _GDN_TYPE else "attention" for kind in release_types]
    # The release applies sliding_window on "sliding_attention" layers only, and only with use_sliding_window.
    window = get("sliding_window") if get("use_sliding_window") else None
    kinds = {kind for kind in release_types if kind != _GDN_TYPE}
    if window is not None and len(kinds) == 2:
        raise refuse(
            "layer_types",
            "mixes sliding_attention and full_attention layers with use_sliding_window "
            "true: ivl has one window for every attention layer",
        )
    if kinds == {"full_attention"}:
        window = None

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if hidden % heads:
        raise refuse("hidden_size", f"= {hidden} is not a multiple of num_attention_heads = {heads}")
    if get("head_dim") != hidden // heads:  # the release computes with hidden / heads and sizes its cache by head_dim
        raise refuse(
            "head_dim",
            f"= {get('head_dim')}{'' if 'head_dim' in text else ' (its default)'} differs from "
            f"hidden_size / num_attention_heads = {hidden // heads}",
        )
    if get("hidden_act") != "silu":
        raise refuse("hidden_act", f"= {get('hidden_act')!r}: ivl's MLP is SwiGLU (silu)")
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise refuse("rope_scaling.rope_type", f"= {rope_type!r}: ivl has plain multimodal RoPE only")
    if "mrope_section" not in rope:
        raise refuse("rope_scaling.mrope_section", "is missing (the release's attention needs it)")
    rope_theta = text.get("rope_theta") or rope.get("rope_theta") or RELEASE_DEFAULTS["rope_theta"]

    if get("num_linear_key_value_heads") != get("num_linear_heads"):
        raise refuse(
            "num_linear_key_value_heads",
            f"= {get('num_linear_key_value_heads')} differs from "
            f"num_linear_heads = {get('num_linear_heads')}: ivl's Gated "
            "DeltaNet has no grouped key/value heads",
        )
    for flag in ("use_gate", "use_short_conv"):
        if not get(flag):
            raise refuse(flag, "is false: ivl's Gated DeltaNet always has its output gate and short convolutions")
    head_k, expand_v = get("linear_head_dim"), get("expand_v")
    if not math.isclose(head_k * expand_v, round(head_k * expand_v), rel_tol=1e-5):
        raise refuse("expand_v", f"= {expand_v} gives a value head width of {head_k * expand_v}, not a whole number")
    rms_eps, norm_eps = get("rms_norm_eps"), get("norm_eps")

    hybrid = dict(
        vocab_size=get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=get("intermediate_size"),
        num_layers=num_layers,
        layer_types=layer_types,
        num_attention_heads=heads,
        num_key_value_heads=heads if get("num_key_value_heads") is None else get("num_key_value_heads"),
        head_dim=hidden // heads,
        attention_bias=True,  # the release's q/k/v projections always have biases
        window=window,
        rope_theta=float(rope_theta),
        mrope_section=list(rope["mrope_section"]),
        linear_num_heads=get("num_linear_heads"),
        linear_head_k_dim=head_k,
        linear_head_v_dim=int(head_k * expand_v),  # as the release computes it
        linear_conv_size=get("conv_size"),
        rms_norm_eps=rms_eps,
        linear_norm_eps=None if norm_eps == rms_eps else norm_eps,
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        initializer_range=get("initializer_range"),
    )
    vision = {k: v for k, v in (release.get("vision_config") or {}).items() if k not in BOOKKEEPING}
    try:
        return InfiniteVLConfig(
            text=HybridConfig(**hybrid),
            vision=vision,
            image_token_id=get("image_token_id"),
            video_token_id=get("video_token_id"),
            vision_start_token_id=get("vision_start_token_id"),
            **_stop_tokens_from_release(text),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def config_to_release(
    config: InfiniteVLConfig, dtype: torch.dtype = torch.bfloat16, base: dict | None = None, where: str = "config.json"
) -> dict:
    """The release's config.json for an ivl config: ``base`` (the release config the model came from, else the
    published one) with every field ivl knows replaced by its value; refuses, naming the field, what the release
    cannot express."""
    t = config.text
    for i, kind in enumerate(t.layer_types):
        if kind not in ("attention", "gated_deltanet"):
            raise ValueError(
                f"{where}: text.layer_types[{i}] = {kind!r} has no form in the release (its layers are "
                "attention and Gated DeltaNet)"
            )
    if t.head_dim * t.num_attention_heads != t.hidden_size:
        raise ValueError(
            f"{where}: text.head_dim = {t.head_dim}: the release's attention heads are hidden_size / "
            f"num_attention_heads = {t.hidden_size / t.num_attention_heads:g} wide"
        )
    if not t.attention_bias:
        raise ValueError(f"{where}: text.attention_bias is false: the release's q/k/v projections have biases")
    expand_v = t.linear_head_v_dim / t.linear_head_k_dim
    expand_v = int(expand_v) if expand_v.is_integer() else expand_v
    if int(t.linear_head_k_dim * expand_v) != t.linear_head_v_dim:
        raise ValueError(
            f"{where}: text.linear_head_v_dim = {t.linear_head_v_dim} is not linear_head_k_dim = "
            f"{t.linear_head_k_dim} times an expand_v the release reproduces"
        )

    base = dict(RELEASE_TEMPLATE if base is None else base)
    base.update(base.pop("text_config", None) or {})  # written flat, as published: a nested copy would win
    attention = "sliding_attention" if t.window is not None else "full_attention"
    release = {
        **base,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "hidden_act": "silu",
        "layer_types": [attention if kind == "attention" else _GDN_TYPE for kind in t.layer_types],
        "use_sliding_window": t.window is not None,
        "sliding_window": t.window,
        "rope_theta": t.rope_theta,
        "rope_scaling": {
            **(base.get("rope_scaling") or {}),
            "mrope_section": list(t.mrope_section),
            "rope_type": "default",
            "type": "default",
        },
        "rms_norm_eps": t.rms_norm_eps,
        "norm_eps": t.linear_output_eps,
        "num_linear_heads": t.linear_num_heads,
        "num_linear_key_value_heads": t.linear_num_heads,
        "linear_head_dim": t.linear_head_k_dim,
        "expand_v": expand_v,
        "conv_size": t.linear_conv_size,
        "use_gate": True,
        "use_short_conv": True,
        "tie_word_embeddings": t.tie_word_embeddings,
        "initializer_range": t.initializer_range,
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    release.pop("rope_parameters", None)
    release.update(_stop_tokens_to_release(config.eos_token_ids, config.pad_token_id))
    if release["pad_token_id"] is None:
        del release["pad_token_id"]
    vision_kept = {k: v for k, v in (base.get("vision_config") or {}).items() if k in BOOKKEEPING}
    release["vision_config"] = {
        "model_type": RELEASE_MODEL_TYPE,
        **vision_kept,
        **config.vision,
        "torch_dtype": release["torch_dtype"],
    }
    first = [k for k in ("attn_implementation", "architectures", "auto_map") if k in release]
    return {k: release[k] for k in [*first, *sorted(set(release) - set(first))]}  # laid out as the published file


def _stop_tokens_from_release(text: dict) -> dict:
    """eos_token_id (one or a list) and bos_token_id, which Qwen's generation stops on too; pad: pad_token_id, else
    bos_token_id."""
    eos = text.get("eos_token_id")
    eos = [t for t in (eos if isinstance(eos, list) else [eos]) if t is not None]
    bos = text.get("bos_token_id")
    if bos is not None and bos not in eos:
        eos.append(bos)
    if not eos:  # nothing to stop on: ivl's defaults (Qwen's)
        return {}
    pad = next((t for t in (text.get("pad_token_id"), bos, *eos) if t is not None), 0)
    return {"eos_token_ids": eos, "pad_token_id": pad}


def _stop_tokens_to_release(eos: list[int], pad: int) -> dict:
    """The inverse of ``_stop_tokens_from_release``: Qwen's pattern (the last stop token is <|endoftext|>, the pad)
    as the release writes it (bos_token_id, and eos_token_id one id), anything else spelled out."""
    if not eos:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": pad}
    *stops, last = eos
    if stops and last == pad:
        return {"bos_token_id": last, "eos_token_id": stops[0] if len(stops) == 1 else stops, "pad_token_id": None}
    return {"bos_token_id": None, "eos_token_id": eos[0] if len(eos) == 1 else list(eos), "pad_token_id": pad}


# ---- parameter names -------------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
# Within a decoder layer: release name -> ivl name (the rest of the name is the same).
_BLOCK = {
    "input_layernorm.": "mixer_norm.",
    "post_attention_layernorm.": "mlp_norm.",
    "self_attn.": "mixer.",
    "mlp.": "mlp.",
}
# The release's module names (model.language_model.*, model.visual.*), and the older layout its loader maps onto them
# (model.*, visual.*), which transformers 4.52-4.57 also write: files in either layout are read. ``to_release``
# writes the module names, the layout that both the release's own transformers (4.57) and transformers 5 load.
_VISION_PREFIXES = ("model.visual.", "visual.")
_TEXT_PREFIXES = ("model.language_model.", "model.")


def ivl_name(release_name: str) -> str | None:
    """ivl's name for a release tensor, in either of the release's layouts; None: not a name the release has."""
    for prefix in _VISION_PREFIXES:
        if release_name.startswith(prefix):
            return "visual." + release_name[len(prefix) :]
    if release_name == "lm_head.weight":
        return "lm.lm_head.weight"
    for prefix in _TEXT_PREFIXES:
        if release_name.startswith(prefix):
            rest = release_name[len(prefix) :]
            if layer := _LAYER.fullmatch(rest):
                index, inner = layer.groups()
                for theirs, ours in _BLOCK.items():
                    if inner.startswith(theirs):
                        return f"lm.layers.{index}.{ours}{inner[len(theirs) :]}"
                return f"lm.layers.{index}.{inner}"  # not ivl's: refused by the comparison with the model
            return "lm." + rest
    return None


def release_name(name: str, legacy: bool = False) -> str:
    """The release's name for an ivl tensor: its module name (``model.language_model.*``, ``model.visual.*``), or
    with ``legacy`` the older layout (``model.*``, ``visual.*``)."""
    text, vision = _TEXT_PREFIXES[legacy], _VISION_PREFIXES[legacy]
    if name.startswith("visual."):
        return vision + name.removeprefix("visual.")
    if name == "lm.lm_head.weight":
        return "lm_head.weight"
    if layer := _LAYER.fullmatch(name.removeprefix("lm.")):
        index, inner = layer.groups()
        for theirs, ours in _BLOCK.items():
            if inner.startswith(ours):
                return f"{text}layers.{index}.{theirs}{inner[len(ours) :]}"
    if name in ("lm.embed_tokens.weight", "lm.norm.weight"):
        return text + name.removeprefix("lm.")
    raise ValueError(f"{name} has no name in the release")


def state_from_release(
    state: dict[str, torch.Tensor], config: InfiniteVLConfig, where: str = "the release"
) -> dict[str, torch.Tensor]:
    """A release state dict (either layout) under ivl's names, tensors unchanged; a tied ``lm_head.weight`` is left
    out (it must equal the embeddings). Refuses a tensor ivl's model of ``config`` has no place or shape for."""
    out, origin, head = {}, {}, None
    for name, tensor in state.items():
        ours = ivl_name(name)
        if ours is None:
            raise ValueError(f"{where}: tensor {name!r} is not one of the release's (model.*, visual.*, lm_head)")
        if ours in origin:
            raise ValueError(f"{where}: tensor {name!r} is there twice, in both of the release's layouts")
        origin[ours] = name
        if ours == "lm.lm_head.weight" and config.text.tie_word_embeddings:
            head = (name, tensor)
            continue
        out[ours] = tensor
    if head is not None and not torch.equal(head[1], out.get("lm.embed_tokens.weight", head[1])):
        raise ValueError(f"{where}: tensor {head[0]!r} differs from the embeddings but tie_word_embeddings is true")
    legacy = not any(name.startswith(("model.language_model.", "model.visual.")) for name in state)
    _check_against_model(out, config, where, lambda ours: origin.get(ours) or release_name(ours, legacy))
    return out


def state_to_release(
    state: dict[str, torch.Tensor], config: InfiniteVLConfig, where: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """An ivl state dict under the release's module names, tensors unchanged, no tied head."""
    if config.text.tie_word_embeddings:
        state = {n: t for n, t in state.items() if n != "lm.lm_head.weight"}
    _check_against_model(state, config, where, lambda name: name)
    return {release_name(name): tensor for name, tensor in state.items()}


def _check_against_model(state: dict[str, torch.Tensor], config: InfiniteVLConfig, where: str, shown) -> None:
    """Every tensor ivl's model of ``config`` has (tied copies aside), of its shape, and no other; ``shown`` turns
    an ivl name into the name the user's files have."""
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        model = InfiniteVL(config)
    tied = checkpoint.tied_names(model)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in tied}
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"{where}: tensor {shown(name)!r} has no place in the model its config describes")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{where}: tensor {shown(name)!r} has shape {tuple(tensor.shape)}; its config implies {expected[name]}"
            )
    missing = [shown(n) for n in expected if n not in state]
    if missing:
        raise ValueError(f"{where}: {len(missing)} tensors the config implies are missing, e.g. {missing[:3]}")


# ---- folders ---------------------------------------------------------------------------------------------------


def from_release(folder: str | Path, out: str | Path) -> list[str]:
    """Write the release-format checkpoint ``folder`` as an ivl checkpoint folder ``out`` (config.json +
    safetensors, the processor files, and the release's config.json as release_config.json). Returns the names of the
    files now in ``out``."""
    folder, out = Path(folder), Path(out)
    _refuse_same_folder(folder, out)
    release = _read_json(folder / checkpoint.CONFIG)
    config = config_from_release(release, str(folder / checkpoint.CONFIG))
    state = state_from_release(checkpoint.read_state(folder), config, str(folder))
    checkpoint.save_state(state, config.to_dict(), out)
    (out / RELEASE_CONFIG_COPY).write_text(json.dumps(release, indent=2) + "\n")
    if not checkpoint.has_tokenizer(folder):
        # The release's tokenizer is Qwen2.5-VL's: without its files, the bundled Qwen2.5 one (what ivl's own folders
        # get without one); the release's processor files that are there then replace ivl's defaults.
        checkpoint.save_processor(out)
    _copy_processor_files(folder, out)
    return _written(out)


def to_release(ivl_folder: str | Path, out: str | Path) -> list[str]:
    """Write the ivl checkpoint ``ivl_folder`` in the release's format to ``out`` (config.json, safetensors in the
    release's module names, the processor files; the release's modelling code is not written). Returns the names of the
    files now in ``out``."""
    ivl_folder, out = Path(ivl_folder), Path(out)
    _refuse_same_folder(ivl_folder, out)
    where = str(ivl_folder / checkpoint.CONFIG)
    config_dict, dtype = checkpoint.read_config(ivl_folder)
    if config_dict.get("model_type") == RELEASE_MODEL_TYPE:
        raise ValueError(
            f"{where}: model_type = {RELEASE_MODEL_TYPE!r}: already the release's format "
            "(--from-release reads it into an ivl folder)"
        )
    try:
        config = InfiniteVLConfig.from_dict(config_dict)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None
    base = ivl_folder / RELEASE_CONFIG_COPY
    release = config_to_release(config, dtype, _read_json(base) if base.exists() else None, where)
    state = state_to_release(checkpoint.read_state(ivl_folder), config, str(ivl_folder))
    checkpoint.save_state(state, release, out)
    _copy_processor_files(ivl_folder, out)
    return _written(out)


def _copy_processor_files(source: Path, target: Path) -> list[str]:
    copied = sorted({p.name for pattern in PROCESSOR_FILES for p in source.glob(pattern) if p.is_file()})
    for name in copied:
        shutil.copyfile(source / name, target / name)
    return copied


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def _refuse_same_folder(source: Path, out: Path) -> None:
    if out.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the folder read from; its config.json would be overwritten")


def _written(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_file())
