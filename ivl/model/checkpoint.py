"""Self-describing checkpoint folders: config.json + safetensors (one file, or shards with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from ivl.model.renames import renamed_keys

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def save(model: nn.Module, config: dict, directory: str | Path, max_shard_size: str | int = "5GB") -> None:
    save_state(_unique_tensors(model), config, directory, max_shard_size)


def save_state(
    state: dict[str, torch.Tensor], config: dict, directory: str | Path, max_shard_size: str | int = "5GB"
) -> None:
    """Write a state dict (tied duplicates already dropped) as a checkpoint folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = next(iter(state.values())).dtype if state else torch.float32
    (directory / CONFIG).write_text(json.dumps({**config, "dtype": str(dtype).removeprefix("torch.")}, indent=2))
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: _alone(state[n]) for n in names}, directory / filename, metadata={"format": "pt"})
    index = directory / INDEX
    if split.is_sharded:
        index.write_text(json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
    elif index.exists():  # an older, sharded save in the same folder would shadow this one
        index.unlink()


def has_tokenizer(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / "tokenizer_config.json").exists()


def save_processor(directory: str | Path, source: str | Path | None = None) -> None:
    """The processor files beside the weights (tokenizer, chat_template.json, preprocessor_config.json), so that
    ``Processor.from_pretrained(directory)`` works: ``source``'s (a folder with tokenizer files: a teacher's, or
    the checkpoint the model came from), else the bundled Qwen2.5 tokenizer with ivl's defaults."""
    from ivl.data.processing import Processor  # data-level; needed only when writing a folder

    if not has_tokenizer(source):
        source = None
    elif Path(source).resolve() == Path(directory).resolve():
        return
    Processor.from_pretrained(source).save_pretrained(directory)


def read_config(directory: str | Path) -> tuple[dict, torch.dtype]:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a checkpoint folder written by save_pretrained")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
    if isinstance(config.get("text"), dict):  # a folder saved before a field was renamed reads with the new names
        config["text"] = renamed_keys(config["text"], str(path))
    return config, getattr(torch, config.get("dtype", "float32"))


def load_into(model: nn.Module, directory: str | Path) -> None:
    """Load every tensor of the folder into ``model`` (same names; tied copies need not be stored)."""
    directory = Path(directory)
    files = _weight_files(directory)
    state = model.state_dict()
    loaded = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in state:
                    raise ValueError(f"{file}: tensor {name!r} does not belong to this model")
                tensor = f.get_tensor(name)
                if tensor.shape != state[name].shape:
                    raise ValueError(
                        f"{file}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(state[name].shape)}"
                    )
                with torch.no_grad():
                    state[name].copy_(tensor)
                loaded.add(name)
    missing = [n for n in state if n not in loaded and n not in tied_names(model)]
    if missing:
        raise ValueError(f"{directory}: no tensor for {len(missing)} parameters, e.g. {missing[:5]}")


def read_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, on the CPU, in its saved dtype."""
    state = {}
    for file in _weight_files(Path(directory)):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()})
    return state


def tied_names(model: nn.Module) -> dict[str, str]:
    """{second name: first name} of parameters registered under two names (a tied LM head)."""
    first, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    if (directory / SINGLE).exists():
        return [directory / SINGLE]
    raise FileNotFoundError(f"{directory} holds neither {SINGLE} nor {INDEX}")


def _alone(t: torch.Tensor) -> torch.Tensor:
    """t in storage of its own: safetensors refuses tensors that share storage, such as the row blocks of the
    projections packed for decoding (ivl.model.decoding.packing)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the second name of tied parameters (safetensors refuses shared storage)."""
    tied = tied_names(model)
    return {n: t.detach() for n, t in model.state_dict().items() if n not in tied}
