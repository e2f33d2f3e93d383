"""Names that changed and still load: configs, checkpoints and commands written with an old name keep working, and
each old name used says once which name replaces it. Every such name is listed here, nowhere else."""

from __future__ import annotations

import warnings

RENAMED = {
    # HybridConfig fields: these sizes serve every linear mixer, not only Gated DeltaNet.
    "gdn_num_heads": "linear_num_heads",
    "gdn_head_k_dim": "linear_head_k_dim",
    "gdn_head_v_dim": "linear_head_v_dim",
    "gdn_conv_size": "linear_conv_size",
    # The conversion's initialisation of the linear mixers (convert_qwen2_5_vl, the stages, python -m ivl.convert).
    "gdn_init": "linear_init",
    # The placeholder of trainable-parameter patterns for the linear-mixer layers' indices.
    "{gdn}": "{linear}",
}
"""Old name -> the name now."""


def warn_renamed(old: str, where: str, stacklevel: int = 3) -> str:
    """Say (a FutureWarning, shown once per place it comes from) that ``old`` is now ``RENAMED[old]``; returns the
    new name."""
    new = RENAMED[old]
    warnings.warn(
        f"{where}: {old!r} is renamed {new!r}; the old name will stop working in a later release",
        FutureWarning,
        stacklevel=stacklevel,
    )
    return new


def renamed_keys(data: dict, where: str) -> dict:
    """``data`` with old keys replaced by their new names (a warning per old key found)."""
    out = {}
    for key, value in data.items():
        if key in RENAMED:
            if RENAMED[key] in data:
                raise ValueError(f"{where}: both {key!r} and {RENAMED[key]!r} given; {key!r} is the old name")
            key = warn_renamed(key, where, stacklevel=4)
        out[key] = value
    return out
