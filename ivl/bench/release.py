"""Logits of the public InfiniteVL release's own forward against ivl's on the converted folder (random weights).

Imports the release's ``modeling_infinitevl.py`` / ``configuration_infinitevl.py`` from ``--release-code`` (the
repository never holds them), builds a small random-weight release model from the folder's config.json with its
sizes made small, saves it in the release's format (config.json + safetensors), converts that folder with
``ivl.model.release.from_release`` and compares the logits of an image + text batch in float32 and bfloat16. Then
writes the ivl folder back with ``to_release`` and loads that with the release's own ``from_pretrained``: every
tensor must come back bit for bit.

The release's code was written for transformers 4.57 and flash-attn; here it runs with a few adjustments, all
outside its files: eager attention (its attention layers ask for flash-attn, and its causal mask then covers every
layer: sequences stay below the window), ``pad_token_id`` on the text config, the "default" RoPE initialiser and a
dict of tied weights (transformers 5), the renamed mask-function arguments, and, where fla's Triton kernels cannot
run (no CUDA), reference PyTorch versions of its four ops (fla's own naive gated delta rule; the causal depthwise
convolution, the L2 norm and the gated RMSNorm written out as fla's kernels compute them, in float32).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import inspect
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from ivl.model import InfiniteVL
from ivl.model.release import from_release, to_release

PACKAGE = "infinitevl_release"
# Small sizes for the published config.json: 8 layers (attention at 0 and 4), GQA, expand_v 2, a 2-block tower.
SMALL = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_linear_heads=4,
    num_linear_key_value_heads=4,
    linear_head_dim=64,
    expand_v=2,
    conv_size=4,
    image_token_id=2000,
    video_token_id=2001,
    vision_start_token_id=2002,
    vision_end_token_id=2003,
    vision_token_id=2004,
    bos_token_id=2005,
    eos_token_id=2006,
)
SMALL_VISION = dict(
    depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=256, fullatt_block_indexes=[1]
)
SMALL_MROPE = [8, 12, 12]  # head_dim / 2
FP32_TOLERANCE = 1e-4
"""float32: largest |difference| allowed, relative to the largest |logit|."""
BF16_FACTOR = 2.0
"""bfloat16: ivl may differ from the release by at most this many times the release's own bfloat16 error (its
bfloat16 logits against its float32 ones): the two compute in different orders, and each rounds as bfloat16 does."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--release-code",
        type=Path,
        required=True,
        help="folder with the release's modeling_infinitevl.py, configuration_infinitevl.py and "
        "config.json (hustvl/InfiniteVL, infinitevl/infinitevl_standard)",
    )
    parser.add_argument("--text-tokens", type=int, default=96, help="text tokens per row (plus one image in row 0)")
    parser.add_argument("--image-size", type=int, default=224, help="square image side in pixels (multiple of 28)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the release and ivl folders here")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda: fla's own kernels; cpu: PyTorch references of them",
    )


def run(args: argparse.Namespace) -> None:
    modeling = import_release(args.release_code)
    config = small_release_config(json.loads((args.release_code / "config.json").read_text()))
    torch.manual_seed(args.seed)
    release = build_release_model(modeling, config, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        save_release_folder(release, config, root / "release")
        from_release(root / "release", root / "ivl")
        inputs = {k: v.to(args.device) for k, v in image_text_batch(config, args.text_tokens, args.image_size).items()}
        with torch.no_grad():
            theirs32 = release(**inputs, use_cache=False).logits.float()
            ours = InfiniteVL.from_pretrained(root / "ivl", dtype=torch.float32, device=args.device)
            ours32 = ours(**inputs).logits.float()
            to_release(root / "ivl", root / "back")
            reloaded = load_with_release_code(modeling, root / "back").state_dict()
            exported = [name for name, t in release.state_dict().items() if torch.equal(t.cpu(), reloaded[name])]
            theirs16 = release.to(torch.bfloat16)(**bf16(inputs), use_cache=False).logits.float()
            ours16 = ours.to(torch.bfloat16)(**bf16(inputs)).logits.float()
    scale = theirs32.abs().max().item()
    diff32 = (ours32 - theirs32).abs().max().item()
    diff16 = (ours16 - theirs16).abs().max().item()
    floor16 = (theirs16 - theirs32).abs().max().item()  # what bfloat16 costs the release itself
    ours16_error = (ours16 - theirs32).abs().max().item()
    rows = [("float32", diff32, FP32_TOLERANCE * scale), ("bfloat16", diff16, BF16_FACTOR * floor16)]
    print(
        f"# release forward vs ivl on the converted folder, {datetime.date.today()}, {args.device}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, fla {importlib.metadata.version('fla-core')} "
        f"({'its Triton kernels' if args.device != 'cpu' else 'PyTorch references of its kernels'})"
    )
    print(
        f"inputs: {tuple(inputs['input_ids'].shape)} tokens, one {args.image_size}x{args.image_size} image in row "
        f"0; max |logit| {scale:.3g}; against the release's float32 logits, bfloat16 is off by {floor16:.3g} "
        f"(release) and {ours16_error:.3g} (ivl)"
    )
    print("| dtype | max abs logit difference | tolerance | within |")
    print("| --- | --- | --- | --- |")
    for dtype, diff, tolerance in rows:
        print(f"| {dtype} | {diff:.3g} | {tolerance:.3g} | {'yes' if diff <= tolerance else 'NO'} |")
    print(
        f"--to-release, loaded by the release's from_pretrained: {len(exported)} of {len(reloaded)} tensors "
        "bit-identical to the release model's"
    )
    if any(diff > tolerance for _, diff, tolerance in rows) or len(exported) != len(reloaded):
        raise SystemExit("ivl differs from the release beyond the tolerance")


# ---- the release's code, imported from the user's folder --------------------------------------------------------


def import_release(folder: Path) -> types.ModuleType:
    """The release's modeling module, its folder registered as a package: the standard variant imports its config
    relatively, the streaming one absolutely (both resolve to the same module)."""
    for name in ("modeling_infinitevl.py", "configuration_infinitevl.py", "config.json"):
        if not (folder / name).is_file():
            raise SystemExit(f"--release-code {folder}: no {name} there")
    try:
        import fla  # noqa: F401  (the release's layers are fla's)
    except ImportError as err:
        raise SystemExit(
            f"the release's code needs fla: pip install flash-linear-attention==0.6.0 fla-core==0.6.0 ({err})"
        ) from None
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(folder)]
    sys.modules[PACKAGE] = package
    sys.modules["configuration_infinitevl"] = importlib.import_module(f"{PACKAGE}.configuration_infinitevl")
    modeling = importlib.import_module(f"{PACKAGE}.modeling_infinitevl")
    if hasattr(modeling.InfiniteVLVisionTransformerPretrainedModel, "set_graph_bucket"):
        raise SystemExit(
            f"--release-code {folder}: the streaming variant, whose vision tower runs as CUDA graphs "
            "only; pass infinitevl/infinitevl_standard (the same language model, the plain Qwen2.5-VL "
            "tower)"
        )
    adjust_for_transformers(modeling)
    return modeling


def adjust_for_transformers(modeling: types.ModuleType) -> None:
    """What transformers 5 changed under the release's code (each adjustment only where it is needed)."""
    from transformers import masking_utils

    if "default" not in modeling.ROPE_INIT_FUNCTIONS:  # 5.x keeps the plain RoPE outside the table
        modeling.ROPE_INIT_FUNCTIONS = {**modeling.ROPE_INIT_FUNCTIONS, "default": default_rope}
        modeling.InfiniteVLRotaryEmbedding.compute_default_rope_parameters = staticmethod(default_rope)
    head = modeling.InfiniteVLQwen2_5_VLForConditionalGeneration
    if isinstance(head._tied_weights_keys, list):  # 5.x: {tied name: source name}
        head._tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        if "input_embeds" not in inspect.signature(getattr(masking_utils, name)).parameters:
            setattr(modeling, name, renamed_mask_arguments(getattr(masking_utils, name)))


def default_rope(config, device=None, *args, **kwargs) -> tuple[torch.Tensor, float]:
    """Plain RoPE inverse frequencies over the attention head (hidden / heads, as the release's attention)."""
    dim = config.hidden_size // config.num_attention_heads
    base = getattr(config, "rope_theta", None) or 1_000_000.0
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim), 1.0


def renamed_mask_arguments(fn):
    """The mask function called with the release's argument names (input_embeds, past_key_values)."""
    names = inspect.signature(fn).parameters

    def call(config, input_embeds, attention_mask, cache_position=None, past_key_values=None, position_ids=None):
        kwargs = dict(
            config=config, inputs_embeds=input_embeds, attention_mask=attention_mask, position_ids=position_ids
        )
        kwargs["cache" if "cache" in names else "past_key_values"] = past_key_values
        if "cache_position" in names:
            kwargs["cache_position"] = cache_position
        return fn(**kwargs)

    return call


# ---- a small random release model and its folder ----------------------------------------------------------------


def small_release_config(published: dict) -> dict:
    config = {**published, **SMALL, "attn_implementation": "flash_attention_2", "torch_dtype": "float32"}
    config["rope_scaling"] = {**published["rope_scaling"], "mrope_section": SMALL_MROPE}
    config["vision_config"] = {**published["vision_config"], **SMALL_VISION, "torch_dtype": "float32"}
    return config


def build_release_model(modeling: types.ModuleType, config: dict, device: str) -> torch.nn.Module:
    release_config = sys.modules["configuration_infinitevl"].InfiniteVLConfig(
        **{**config, "attn_implementation": "eager"}
    )  # flash-attn: neither installed nor needed at this length
    release_config.text_config.pad_token_id = None  # read by its embedding; 5.x configs no longer default it
    model = modeling.InfiniteVLQwen2_5_VLForConditionalGeneration(release_config).float().eval()
    for module in model.modules():  # its attention layers set flash-attn on the shared text config
        if getattr(getattr(module, "config", None), "_attn_implementation", None) == "flash_attention_2":
            module.config._attn_implementation = "eager"
    if device == "cpu":
        use_reference_ops(modeling, model)
    with torch.no_grad():  # every parameter random, the norms, decays and convolutions too: nothing is vacuous
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.to(device)


def save_release_folder(model: torch.nn.Module, config: dict, folder: Path) -> None:
    """config.json as published (flat) and the model's state dict under its module names (model.language_model.*,
    model.visual.*), the tied head left out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def load_with_release_code(modeling: types.ModuleType, folder: Path) -> torch.nn.Module:
    """A release-format folder as the release's own loader reads it (on the CPU, float32)."""
    config = json.loads((folder / "config.json").read_text())
    release_config = sys.modules["configuration_infinitevl"].InfiniteVLConfig(
        **{**config, "attn_implementation": "eager"}
    )
    release_config.text_config.pad_token_id = None
    return modeling.InfiniteVLQwen2_5_VLForConditionalGeneration.from_pretrained(
        str(folder), config=release_config, attn_implementation="eager", dtype=torch.float32
    )


def image_text_batch(config: dict, text_tokens: int, image_size: int) -> dict:
    """Two rows of equal length: text, an image (vision_start, its placeholders, vision_end), text; and text only."""
    grid = image_size // 14
    image = [config["vision_start_token_id"]] + [config["image_token_id"]] * (grid * grid // 4)
    image += [config["vision_end_token_id"]]
    half = text_tokens // 2
    row0 = torch.cat([torch.randint(0, 1900, (half,)), torch.tensor(image), torch.randint(0, 1900, (half,))])
    row1 = torch.randint(0, 1900, (row0.numel(),))
    return {
        "input_ids": torch.stack([row0, row1]),
        "pixel_values": torch.randn(grid * grid, 3 * 2 * 14 * 14),
        "image_grid_thw": torch.tensor([[1, grid, grid]]),
    }


def bf16(inputs: dict) -> dict:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}


# ---- fla's ops without Triton -----------------------------------------------------------------------------------


def use_reference_ops(modeling: types.ModuleType, model: torch.nn.Module) -> None:
    """fla's Triton kernels need a GPU: its naive gated delta rule, and the convolution and gated norm as its kernels
    compute them (float32 inside, the input's dtype out)."""
    modeling.chunk_gated_delta_rule = reference_gated_delta_rule
    modeling.fused_recurrent_gated_delta_rule = reference_gated_delta_rule
    for module in model.modules():
        if isinstance(module, modeling.ShortConvolution):
            module.forward = types.MethodType(reference_short_convolution, module)
        elif isinstance(module, modeling.FusedRMSNormGated):
            module.forward = types.MethodType(reference_gated_rms_norm, module)


def reference_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm_in_kernel=False,
    scale=None,
    **kwargs,
):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    if cu_seqlens is not None:
        raise NotImplementedError("the reference runs unpadded batches only")
    if use_qk_l2norm_in_kernel:  # fla's l2norm: x / sqrt(sum x^2 + 1e-6) in float32, written in the input's dtype
        q, k = (x.float().mul(torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype) for x in (q, k))
    o, state = naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
    )
    return o.to(v.dtype), state


def reference_short_convolution(
    self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **kwargs
):
    if cache is not None or cu_seqlens is not None or residual is not None or mask is not None:
        raise NotImplementedError("the reference runs a whole unpadded sequence only")
    T = x.shape[1]
    y = F.conv1d(
        x.float().transpose(1, 2),
        self.weight.float(),
        None if self.bias is None else self.bias.float(),
        padding=self.kernel_size[0] - 1,
        groups=self.hidden_size,
    )[..., :T]
    if self.activation is not None:
        y = F.silu(y)
    return y.transpose(1, 2).to(x.dtype), None


def reference_gated_rms_norm(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None or self.activation not in ("swish", "silu"):
        raise NotImplementedError("the reference is the swish-gated RMSNorm without a residual")
    from fla.modules.norm.layernorm_gated import rms_norm_ref  # fla's own PyTorch reference of this kernel

    return rms_norm_ref(x, self.weight, None, z=g, eps=self.eps)
