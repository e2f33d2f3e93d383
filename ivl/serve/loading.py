"""What the server serves: a saved InfiniteVL folder, else the demo's trained model, else a tiny random one; or, as
the serving benchmark's reference, a Qwen2.5-VL folder converted exactly (every layer full attention)."""

from __future__ import annotations

from pathlib import Path

import torch

from ivl.data.processing import Processor
from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig

DEMO_MODEL = Path("runs/demo/model")
TINY_VISION = dict(
    depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]
)


def tiny_random_model(seed: int = 0) -> InfiniteVL:
    """A tiny random InfiniteVL over the real Qwen2.5 vocabulary: answers are noise, but every path runs."""
    torch.manual_seed(seed)
    return InfiniteVL(InfiniteVLConfig(text=HybridConfig.tiny(vocab_size=151936), vision=TINY_VISION)).eval()


def resolve(model_dir: str | Path | None) -> Path | None:
    """The folder to serve: the one given, else the demo's trained model when it exists, else None (tiny)."""
    if model_dir is None and DEMO_MODEL.is_dir():
        return DEMO_MODEL
    return Path(model_dir) if model_dir is not None else None


def model_name(model_dir: str | Path | None) -> str:
    folder = resolve(model_dir)
    return "ivl-tiny-random" if folder is None else folder.name


def load(
    model_dir: str | Path | None, device: str = "cpu", dtype: str | None = None
) -> tuple[InfiniteVL, Processor, str]:
    """(model, processor, a name for /v1/models). ``model_dir`` None: the demo's model when it was trained here,
    else the tiny random model with the bundled tokenizer."""
    torch_dtype = getattr(torch, dtype) if dtype else None
    model_dir = resolve(model_dir)
    if model_dir is None:
        model = tiny_random_model().to(device=device, dtype=torch_dtype or torch.float32)
        return model, Processor.from_pretrained(), "ivl-tiny-random"
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a saved InfiniteVL folder (no config.json); train one with "
            f"`python -m ivl.experiments fit --config experiments/demo.yaml` or pass --model"
        )
    model = InfiniteVL.from_pretrained(path, dtype=torch_dtype, device=device)
    processor = Processor.from_pretrained(path if (path / "tokenizer_config.json").is_file() else None)
    return model, processor, path.name


def load_baseline(
    folder: str | Path, device: str = "cpu", dtype: str | None = None
) -> tuple[InfiniteVL, Processor, str]:
    """A transformers Qwen2.5-VL checkpoint as an InfiniteVL whose every layer is full attention: the same
    computation (``tests/test_vlm.py`` holds the conversion to the teacher's logits), served by the same engine, so
    that a benchmark compares the models and not two serving stacks."""
    from ivl.model.convert import convert_qwen2_5_vl

    model, _ = convert_qwen2_5_vl(
        folder, hybrid_ratio=1.0, window=None, dtype=getattr(torch, dtype) if dtype else None, device=device
    )
    model.processor_source = Path(folder)
    return model.eval(), Processor.from_pretrained(folder), f"{Path(folder).name} (full attention)"
