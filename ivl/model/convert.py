"""Turn a Qwen2.5-VL teacher into an InfiniteVL student (Stage I's starting point).

Copied from the teacher: the vision tower and merger, the embeddings, every norm and MLP, the LM head, and the
attention layers that stay attention (they become sliding-window attention with the same weights). Every other
layer gets a fresh linear mixer (Gated DeltaNet, or ``linear_mixer`` for the mixer ablation): by default with the
"mimic" initialisation of the public InfiniteVL code (a near pass-through), or with ``linear_init="attention"`` with
q and the GQA-expanded k copied from the attention layer it replaces (for ablations; mixers with q/k projections).

Teacher weights are read by name, so both checkpoint layouts work: the original release's (``visual.*``,
``model.layers.*``) and transformers 5's (``model.visual.*``, ``model.language_model.*``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig

from ivl.model import checkpoint
from ivl.model.config import HybridConfig, InfiniteVLConfig, layer_types_from_ratio
from ivl.model.mixers import canonical_name, mixer_class
from ivl.model.renames import warn_renamed
from ivl.model.vision import vision_config_dict
from ivl.model.vlm import InfiniteVL

LINEAR_INITS = ("mimic", "attention")


@dataclass
class ConversionReport:
    """Which student tensors came from the teacher (and from where) and which are new."""

    layer_types: list[str]
    attention_layers: list[int] = field(default_factory=list)
    """indices of the layers kept as attention."""
    inherited: dict[str, str] = field(default_factory=dict)
    """student tensor -> teacher tensor it was copied from."""
    new: list[str] = field(default_factory=list)
    """student tensors initialised fresh."""
    unused: list[str] = field(default_factory=list)
    """teacher tensors with no place in the student (the replaced attention layers)."""
    numel: dict[str, int] = field(default_factory=dict)

    @property
    def inherited_parameters(self) -> int:
        return sum(self.numel[n] for n in self.inherited)

    @property
    def new_parameters(self) -> int:
        return sum(self.numel[n] for n in self.new)

    def __str__(self) -> str:
        total = self.inherited_parameters + self.new_parameters
        return "\n".join(
            [
                f"layers: {len(self.layer_types)}, attention kept at {self.attention_layers}",
                f"inherited: {self.inherited_parameters:,} parameters in {len(self.inherited)} tensors "
                f"({self.inherited_parameters / max(total, 1):.1%})",
                f"new:       {self.new_parameters:,} parameters in {len(self.new)} tensors",
                f"teacher tensors left out: {len(self.unused)}",
            ]
        )

    def to_dict(self) -> dict:
        return {
            "layer_types": self.layer_types,
            "inherited": self.inherited,
            "new": self.new,
            "unused": self.unused,
            "inherited_parameters": self.inherited_parameters,
            "new_parameters": self.new_parameters,
        }


def convert_qwen2_5_vl(
    teacher: nn.Module | str | Path,
    hybrid_ratio: float = 0.25,
    window: int | None = 8192,
    layer_types: list[str] | None = None,
    linear_init: str = "mimic",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    linear_mixer: str = "gated_deltanet",
    gdn_init: str | None = None,
) -> tuple[InfiniteVL, ConversionReport]:
    """Build the hybrid student of a Qwen2.5-VL teacher.

    Args:
        teacher: a transformers Qwen2.5-VL model, or a local checkpoint folder (config.json + single or sharded
            safetensors). Nothing is fetched from a hub.
        hybrid_ratio: fraction of layers kept as attention (one at the start of each block of 1/ratio).
        window: sliding window of the kept attention layers (None: full attention).
        layer_types: explicit per-layer mixer names, "attention" / "gated_deltanet" / ... (overrides hybrid_ratio).
        linear_init: how the linear mixers start: "mimic" (default) or "attention" (q and GQA-expanded k from the
            replaced attention layer).
        dtype: student dtype (default: the teacher's).
        linear_mixer: the mixer of the replaced layers when layer_types is None: "gated_deltanet" (InfiniteVL's),
            "mamba2", "gla" or "linear_attention" (the paper's mixer ablation).
        gdn_init: the old name of linear_init.

    Returns:
        (student, report)
    """
    if gdn_init is not None:
        warn_renamed("gdn_init", "convert_qwen2_5_vl")
        linear_init = gdn_init
    if linear_init not in LINEAR_INITS:
        raise ValueError(f"linear_init must be one of {LINEAR_INITS}; got {linear_init!r}")
    teacher_config, tensors, teacher_dtype = _read_teacher(teacher)
    config = student_config(teacher_config, hybrid_ratio, window, layer_types, linear_mixer)
    layer_types = config.text.layer_types
    if linear_init == "attention":
        for kind in {layer_types[i] for i in config.text.linear_layers}:
            if not mixer_class(kind).from_attention:
                raise ValueError(
                    f"linear_init='attention' copies q/k projections, which a {kind} layer does not "
                    "have; use linear_init='mimic'"
                )
    with torch.device(device):
        student = InfiniteVL(config)
    student.to(dtype or teacher_dtype)

    sources = _index_teacher_tensors(tensors)
    report = ConversionReport(layer_types=list(layer_types), attention_layers=config.text.attention_layers)
    used = set()
    state = student.state_dict()
    for name, param in student.named_parameters():
        report.numel[name] = param.numel()
        source = _teacher_name(name, config.text, linear_init)
        if source is None or source not in sources:
            report.new.append(name)
            continue
        value = sources[source]()
        if source.endswith("self_attn.k_proj.weight") and _layer(name) in config.text.linear_layers:
            value = _expand_kv_heads(value, config.text)
        if value.shape != param.shape:
            raise ValueError(
                f"teacher {source} has shape {tuple(value.shape)}, student {name} needs {tuple(param.shape)}"
            )
        with torch.no_grad():
            state[name].copy_(value)
        report.inherited[name] = source
        used.add(source)
    unused = set(sources) - used
    if config.text.tie_word_embeddings:
        unused.discard("lm_head.weight")  # the tied copy of the embeddings, which were inherited
    report.unused = sorted(unused)
    folder = teacher if isinstance(teacher, (str, Path)) else getattr(teacher_config, "_name_or_path", None)
    if checkpoint.has_tokenizer(folder):  # the student goes with its teacher's tokenizer and processor
        student.processor_source = Path(folder)
    return student.eval(), report


def student_config(
    teacher_config: Qwen2_5_VLConfig,
    hybrid_ratio: float = 0.25,
    window: int | None = 8192,
    layer_types: list[str] | None = None,
    linear_mixer: str = "gated_deltanet",
) -> InfiniteVLConfig:
    """The InfiniteVL config ``convert_qwen2_5_vl`` gives a teacher with this config (no weights are read)."""
    text = getattr(teacher_config, "text_config", teacher_config)
    linear_mixer = canonical_name(linear_mixer)
    if layer_types is None:
        layer_types = layer_types_from_ratio(text.num_hidden_layers, hybrid_ratio, linear_mixer)
    return InfiniteVLConfig(
        text=student_text_config(teacher_config, layer_types, window, linear_mixer),
        vision=vision_config_dict(teacher_config.vision_config),
        image_token_id=teacher_config.image_token_id,
        video_token_id=teacher_config.video_token_id,
        vision_start_token_id=teacher_config.vision_start_token_id,
        **_special_tokens(text),
    )


def student_text_config(
    teacher_config, layer_types: list[str], window: int | None, linear_mixer: str = "gated_deltanet"
) -> HybridConfig:
    """The hybrid LM config of a Qwen2.5-VL teacher: its sizes, with linear-mixer heads of the attention's shape and
    value heads twice as wide (the public InfiniteVL's expand_v = 2); the other linear mixers take the same sizes
    (Mamba2 with heads of half the attention's head width: 64 at 4B)."""
    text = getattr(teacher_config, "text_config", teacher_config)
    rope = getattr(text, "rope_parameters", None) or {}
    legacy = getattr(text, "rope_scaling", None) or {}
    head_dim = text.hidden_size // text.num_attention_heads
    return HybridConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        layer_types=list(layer_types),
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=head_dim,
        attention_bias=True,
        window=window,
        rope_theta=rope.get("rope_theta", getattr(text, "rope_theta", 1_000_000.0)),
        mrope_section=list(rope.get("mrope_section", legacy.get("mrope_section", [16, 24, 24]))),
        linear_num_heads=text.num_attention_heads,
        linear_head_k_dim=head_dim,
        linear_head_v_dim=2 * head_dim,
        linear_mixer=linear_mixer,
        mamba2_head_dim=max(head_dim // 2, 1),
        rms_norm_eps=text.rms_norm_eps,
        tie_word_embeddings=bool(
            getattr(teacher_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
        ),
        initializer_range=getattr(text, "initializer_range", 0.02),
    )


def _special_tokens(text) -> dict:
    """Stop and pad tokens: the teacher's eos, plus its bos <|endoftext|> (Qwen's generation config stops on both)."""
    eos = text.eos_token_id if isinstance(text.eos_token_id, list) else [text.eos_token_id]
    eos = [t for t in eos if t is not None]
    if text.bos_token_id is not None and text.bos_token_id not in eos:
        eos.append(text.bos_token_id)
    pad = next(t for t in (text.pad_token_id, text.bos_token_id, *eos, 0) if t is not None)
    return {"eos_token_ids": eos, "pad_token_id": pad}


# ---- names ------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^lm\.layers\.(\d+)\.(.+)$")
_BLOCK_TO_TEACHER = {
    "mixer_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def _layer(name: str) -> int:
    return int(_LAYER.match(name).group(1))


def _teacher_name(name: str, text: HybridConfig, linear_init: str) -> str | None:
    """The canonical teacher tensor a student tensor copies, or None for a fresh one."""
    if name.startswith("visual."):
        return name
    if name == "lm.lm_head.weight":
        return "lm_head.weight"
    if name in ("lm.embed_tokens.weight", "lm.norm.weight"):
        return "text." + name.removeprefix("lm.")
    match = _LAYER.match(name)
    if match is None:
        return None
    i, rest = int(match.group(1)), match.group(2)
    if rest in _BLOCK_TO_TEACHER:
        return f"text.layers.{i}.{_BLOCK_TO_TEACHER[rest]}"
    if i in text.attention_layers and rest.startswith("mixer."):
        return f"text.layers.{i}.self_attn.{rest.removeprefix('mixer.')}"
    if linear_init == "attention" and rest.startswith("mixer."):
        source = mixer_class(text.layer_types[i]).from_attention.get(rest.removeprefix("mixer."))
        return f"text.layers.{i}.self_attn.{source}" if source else None
    return None


def _canonical(key: str) -> str:
    """Teacher key in either layout -> 'visual.*', 'text.*' or 'lm_head.weight'."""
    for prefix in ("model.visual.", "visual."):
        if key.startswith(prefix):
            return "visual." + key[len(prefix) :]
    for prefix in ("model.language_model.", "language_model.model.", "language_model.", "model."):
        if key.startswith(prefix):
            return "text." + key[len(prefix) :]
    return key


def _expand_kv_heads(k_weight: torch.Tensor, text: HybridConfig) -> torch.Tensor:
    """[Hkv * D, hidden] -> [H * D, hidden]: each key head repeated for the query heads that share it."""
    if text.linear_num_heads != text.num_attention_heads or text.linear_head_k_dim != text.head_dim:
        raise ValueError(
            "linear_init='attention' needs linear-mixer heads shaped like the attention heads "
            f"({text.num_attention_heads} x {text.head_dim}); got {text.linear_num_heads} x "
            f"{text.linear_head_k_dim}"
        )
    groups = text.num_attention_heads // text.num_key_value_heads
    D = text.head_dim
    return (
        k_weight.view(text.num_key_value_heads, D, -1).repeat_interleave(groups, dim=0).reshape(-1, k_weight.shape[-1])
    )


# ---- reading the teacher ------------------------------------------------------------------------------------------


def _read_teacher(teacher) -> tuple[Qwen2_5_VLConfig, dict, torch.dtype]:
    """(config, {canonical name: loader}, dtype). Loaders read one tensor at a time, so a folder's weights are
    never all in memory twice."""
    if isinstance(teacher, nn.Module):
        state = teacher.state_dict()
        dtype = next(iter(state.values())).dtype
        return teacher.config, {k: (lambda t=t: t) for k, t in state.items()}, dtype
    folder = Path(teacher)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}/config.json not found: pass a Qwen2.5-VL checkpoint folder or model")
    config = Qwen2_5_VLConfig.from_pretrained(str(folder))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor model.safetensors.index.json")
    loaders, dtype = {}, None
    for file in files:
        with safe_open(str(folder / file), framework="pt") as f:
            for key in f.keys():
                if dtype is None:
                    dtype = f.get_slice(key).get_dtype()
                loaders[key] = lambda path=str(folder / file), key=key: _read_tensor(path, key)
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype, torch.float32)
    return config, loaders, dtype


def _read_tensor(path: str, key: str) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(key)


def _index_teacher_tensors(loaders: dict) -> dict:
    return {_canonical(k): v for k, v in loaders.items()}
