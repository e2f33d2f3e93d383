"""HybridConfig: every size of the hybrid language model, and which token mixer each layer uses."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from ivl.model.mixers import LINEAR_MIXERS, canonical_name
from ivl.model.renames import renamed_keys

MODEL_TYPE = "infinitevl"


def accepts_renamed_fields(cls: type) -> type:
    """Let the dataclass's ``__init__`` take the fields' old names too (``ivl.model.renames``), as ``from_dict``
    does: configs written before a rename keep loading."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs) -> None:
        init(self, *args, **renamed_keys(kwargs, cls.__name__))

    cls.__init__ = __init__
    return cls


@accepts_renamed_fields
@dataclass
class HybridConfig:
    """Configuration of the hybrid (sliding-window attention + linear mixer) language model.

    ``layer_types`` says, per layer, which token mixer it uses. Leave it empty to derive it from
    ``hybrid_ratio``: one attention layer opens each block of ``1 / hybrid_ratio`` layers (InfiniteVL's 1/4 gives
    attention at layers 0, 4, 8, ...), the others are ``linear_mixer``; ratio 0 means no attention layer at all.
    """

    vocab_size: int = 151936
    """Token vocabulary size (the embedding and LM-head rows)."""
    hidden_size: int = 2048
    """Width of the residual stream."""
    intermediate_size: int = 11008
    """Hidden width of each SwiGLU MLP."""
    num_layers: int = 36
    """Number of token-mixing layers (each followed by an MLP)."""
    layer_types: list[str] = field(default_factory=list)
    """Per-layer mixer: "attention", "gated_deltanet" (or "gdn"), "mamba2", "gla" or "linear_attention".
    Derived from hybrid_ratio and linear_mixer when empty."""
    hybrid_ratio: float | None = 0.25
    """Fraction of attention layers (one per block of 1/ratio); used only when layer_types is empty."""
    linear_mixer: str = "gated_deltanet"
    """The constant-memory mixer of the non-attention layers when layer_types is derived from hybrid_ratio:
    gated_deltanet (gdn), mamba2, gla or linear_attention (ungated: the paper's negative control)."""

    # Sliding-window attention layers (Qwen2.5-VL's attention, restricted to a window).
    num_attention_heads: int = 16
    """Query heads of the attention layers."""
    num_key_value_heads: int = 2
    """Key/value heads of the attention layers (grouped-query attention)."""
    head_dim: int = 128
    """Per-head width of the attention layers."""
    attention_bias: bool = True
    """Biases on the q/k/v projections (Qwen2.5 has them; o_proj never does)."""
    window: int | None = 8192
    """Tokens each attention query sees, itself included; None for full causal attention."""
    rope_theta: float = 1_000_000.0
    """RoPE base."""
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    """Rotary frequencies given to the temporal, height and width position axes; sums to head_dim / 2."""

    # Linear-mixer layers. Every linear mixer takes these sizes, so that a layer has about the same parameters and
    # state whichever mixer it runs (Gated DeltaNet, GLA, linear attention: H heads of K x V; Mamba2: H groups of
    # B/C of width K, and H * V / mamba2_head_dim heads over an inner width of H * V).
    linear_num_heads: int = 16
    """Heads of the linear-mixer layers (Mamba2: its B/C groups)."""
    linear_head_k_dim: int = 128
    """Key (and query) width per linear-mixer head (Mamba2: the width of B and C)."""
    linear_head_v_dim: int = 256
    """Value width per linear-mixer head (the state per head is head_k_dim x head_v_dim)."""
    linear_conv_size: int = 4
    """Width of the causal depthwise convolution after the input projections (Gated DeltaNet, Mamba2)."""
    mamba2_head_dim: int = 64
    """Channels per Mamba2 head (its P); the heads share their group's B and C."""

    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (but see linear_norm_eps)."""
    linear_norm_eps: float | None = None
    """Epsilon of the linear mixers' gated output norms; None: rms_norm_eps. fla's layers keep a separate one
    (``norm_eps``, 1e-5 in the public InfiniteVL's Gated DeltaNet), which a converted release checkpoint needs."""
    tie_word_embeddings: bool = True
    """Share the embedding matrix with the LM head."""
    initializer_range: float = 0.02
    """Standard deviation of the normal init of linear and embedding weights."""

    def __post_init__(self) -> None:
        try:
            self.linear_mixer = canonical_name(self.linear_mixer)
        except ValueError as err:
            raise ValueError(f"linear_mixer: {err}") from None
        if self.linear_mixer not in LINEAR_MIXERS:
            raise ValueError(f"linear_mixer must be one of {list(LINEAR_MIXERS)}; got {self.linear_mixer!r}")
        if not self.layer_types:
            if self.hybrid_ratio is None:
                raise ValueError("HybridConfig needs either layer_types or hybrid_ratio")
            self.layer_types = layer_types_from_ratio(self.num_layers, self.hybrid_ratio, self.linear_mixer)
        else:
            self.layer_types = list(self.layer_types)
            self.hybrid_ratio = self.layer_types.count("attention") / len(self.layer_types)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}")
        for i, kind in enumerate(self.layer_types):
            try:
                self.layer_types[i] = canonical_name(kind)
            except ValueError as err:
                raise ValueError(f"layer_types[{i}] = {err}") from None
        inner = self.linear_num_heads * self.linear_head_v_dim
        if "mamba2" in self.layer_types and (
            inner % self.mamba2_head_dim or (inner // self.mamba2_head_dim) % self.linear_num_heads
        ):
            raise ValueError(
                f"mamba2_head_dim ({self.mamba2_head_dim}) must divide the Mamba2 inner width "
                f"linear_num_heads * linear_head_v_dim = {inner} into a multiple of linear_num_heads "
                f"({self.linear_num_heads}) heads (the B/C groups)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None; got {self.window}")

    @property
    def attention_layers(self) -> list[int]:
        """Indices of the attention layers."""
        return [i for i, kind in enumerate(self.layer_types) if kind == "attention"]

    @property
    def linear_layers(self) -> list[int]:
        """Indices of the linear-mixer layers (every layer that is not attention, whichever mixer it runs)."""
        return [i for i, kind in enumerate(self.layer_types) if kind != "attention"]

    @property
    def linear_output_eps(self) -> float:
        """The epsilon the linear mixers' gated output norms use (linear_norm_eps, else rms_norm_eps)."""
        return self.rms_norm_eps if self.linear_norm_eps is None else self.linear_norm_eps

    @classmethod
    def preset(cls, name: str, **overrides) -> HybridConfig:
        """A named configuration: "tiny" (tests, demo) or "infinitevl-4b" (the paper's model)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **renamed_keys(overrides, cls.__name__)})

    @classmethod
    def tiny(cls, **overrides) -> HybridConfig:
        return cls.preset("tiny", **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HybridConfig:
        data = renamed_keys(data, cls.__name__)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HybridConfig fields {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> HybridConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        return cls.from_dict(data)


def layer_types_from_ratio(num_layers: int, ratio: float, linear_mixer: str = "gated_deltanet") -> list[str]:
    """One attention layer at the start of each block of round(1 / ratio) layers; the rest ``linear_mixer``."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"hybrid_ratio must be in [0, 1]; got {ratio}")
    linear_mixer = canonical_name(linear_mixer)
    if ratio == 0:
        return [linear_mixer] * num_layers
    block = round(1 / ratio)
    return ["attention" if i % block == 0 else linear_mixer for i in range(num_layers)]


PRESETS: dict[str, dict] = {
    # Qwen2.5-VL-3B's language model with 3 of every 4 attention layers replaced by Gated DeltaNet.
    "infinitevl-4b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_layers=36,
        hybrid_ratio=0.25,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        attention_bias=True,
        window=8192,
        rope_theta=1_000_000.0,
        mrope_section=[16, 24, 24],
        linear_num_heads=16,
        linear_head_k_dim=128,
        linear_head_v_dim=256,
        linear_conv_size=4,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    # Small enough that the whole test suite runs on 2 CPU cores; keeps every structural feature (GQA, mRoPE,
    # a window shorter than test sequences, value heads wider than key heads).
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        hybrid_ratio=0.25,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=True,
        window=16,
        rope_theta=10_000.0,
        mrope_section=[2, 3, 3],
        linear_num_heads=2,
        linear_head_k_dim=16,
        linear_head_v_dim=32,
        linear_conv_size=4,
        mamba2_head_dim=16,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}


@dataclass
class InfiniteVLConfig:
    """The whole vision-language model: the hybrid LM, the Qwen2.5-VL vision tower and the special tokens.

    ``vision`` holds the keyword arguments of transformers' ``Qwen2_5_VLVisionConfig`` (the tower is theirs,
    unchanged); token ids default to Qwen2.5-VL's.
    """

    text: HybridConfig = field(default_factory=HybridConfig)
    """The hybrid language model."""
    vision: dict = field(default_factory=dict)
    """Keyword arguments of transformers' Qwen2_5_VLVisionConfig (depth, hidden_size, out_hidden_size, ...)."""
    image_token_id: int = 151655
    """<|image_pad|>: one per merged image patch."""
    video_token_id: int = 151656
    """<|video_pad|>: one per merged video patch."""
    vision_start_token_id: int = 151652
    """<|vision_start|>, before every image or video."""
    eos_token_ids: list[int] = field(default_factory=lambda: [151645, 151643])
    """Tokens that end generation (<|im_end|>, <|endoftext|>)."""
    pad_token_id: int = 151643
    """Filler for finished rows in batched generation."""

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = HybridConfig.from_dict(self.text)
        out = self.vision.get("out_hidden_size")
        if out is not None and out != self.text.hidden_size:
            raise ValueError(f"vision.out_hidden_size ({out}) must equal text.hidden_size ({self.text.hidden_size})")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.text.vocab_size:
                raise ValueError(f"{name} = {getattr(self, name)} is outside the vocabulary ({self.text.vocab_size})")

    @property
    def spatial_merge_size(self) -> int:
        return self.vision.get("spatial_merge_size", 2)

    @property
    def tokens_per_second(self) -> float:
        return self.vision.get("tokens_per_second", 4)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "text": self.text.to_dict(), "model_type": MODEL_TYPE}

    @classmethod
    def from_dict(cls, data: dict) -> InfiniteVLConfig:
        data = {k: v for k, v in data.items() if k not in ("model_type", "dtype")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown InfiniteVLConfig fields {unknown}")
        return cls(**data)


class TransformersView(PretrainedConfig):
    """An ivl checkpoint's config.json as transformers' Auto classes see it. They open it too (AutoTokenizer reads
    it before the tokenizer's own files), and registering the type tells them what ``infinitevl`` is instead of
    leaving them to warn that it matches no model they know. ivl reads the file with ``InfiniteVLConfig``."""

    model_type = MODEL_TYPE


AutoConfig.register(MODEL_TYPE, TransformersView, exist_ok=True)
