"""`python -m ivl.experiments fit` with FSDP2Strategy on several processes (two CPU processes on gloo; 2 and 4 GPUs
on NCCL): killed mid-run, resumed from its distributed checkpoint on another number of processes with the same
global batch, it continues with the losses of the run that was never interrupted; its export loads with
InfiniteVL.from_pretrained."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_stages import corpus

from ivl.model import InfiniteVL

TESTS = Path(__file__).parent

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  strategy: {{class_path: ivl.stages.FSDP2Strategy}}
  precision: 32-true
  max_steps: 4
  gradient_clip_val: 0.5
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  use_distributed_sampler: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true, every_n_train_steps: 1}}
model:
  class_path: ivl.stages.InstructModule
  init_args:
    teacher: tiny
    window: 64
    lr: 3.0e-3
    warmup_ratio: 0.0
    trainable: [".*"]
    activation_checkpointing: blocks
    param_dtype: float32
    save_dir: {root}/model
data:
  class_path: ivl.data.ImageDataModule
  init_args:
    train: [{{path: {corpus}}}]
    pack_tokens: null
    batch_size: 1
    image_max_pixels: 3136
"""


def fit(root: Path, corpus_path: Path, devices: int, *extra: str, killed: bool = False, config: str = CONFIG) -> None:
    (root / "config.yaml").write_text(config.format(root=root, corpus=corpus_path))
    inherited = {
        k: v
        for k, v in os.environ.items()  # not a process group this test process may have set up
        if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
    }
    env = {
        **inherited,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "ivl.experiments",
        "fit",
        "--config",
        str(root / "config.yaml"),
        "--trainer.devices",
        str(devices),
        "--trainer.callbacks+=fsdp_run.RecordStepLosses",
        "--trainer.callbacks.path",
        str(root / "losses.jsonl"),
        *extra,
    ]
    done = subprocess.run(command, env=env, cwd=root, timeout=600, capture_output=True, text=True)
    # gloo's threads can abort a CPU process at interpreter exit, after the run has finished and written
    # everything ("terminate called without an active exception"): not a failure of the run.
    exit_abort = "terminate called without an active exception" in done.stderr and (root / "model").exists()
    assert (done.returncode != 0 and not exit_abort) == killed, done.stderr[-3000:]


def losses(root: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (root / "losses.jsonl").read_text().splitlines())}


def gpus(n: int) -> list:
    return [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPUs")]


@pytest.mark.parametrize(
    "accelerator, before, after",
    [
        ("cpu", 2, 1),
        ("cpu", 1, 2),
        pytest.param("gpu", 2, 1, marks=gpus(2)),
        pytest.param("gpu", 4, 2, marks=gpus(4)),
        pytest.param("gpu", 2, 4, marks=gpus(4)),
    ],
)
def test_fsdp_run_killed_resumes_on_another_number_of_processes(tmp_path, accelerator, before, after):
    """Killed after step 2 on ``before`` processes, resumed on ``after``: the global batch (one sample per process
    and micro-batch) stays the same through gradient accumulation, and so do the losses."""
    data = tmp_path / "data"
    data.mkdir()
    world = max(before, after)
    corpus_path = corpus(data, n=6 * world)
    full, killed = tmp_path / "full", tmp_path / "killed"
    full.mkdir(), killed.mkdir()
    on = ("--trainer.accelerator", accelerator)

    def accumulate(devices):
        return ("--trainer.accumulate_grad_batches", str(world // devices))

    fit(full, corpus_path, before, *on, *accumulate(before))
    fit(
        killed,
        corpus_path,
        before,
        *on,
        *accumulate(before),
        "--trainer.callbacks+=fsdp_run.KillAt",
        "--trainer.callbacks.step",
        "2",
        killed=True,
    )
    assert sorted(losses(killed)) == [1, 2] and not (killed / "model").exists()  # really stopped after step 2
    assert (killed / "checkpoints" / "last.ckpt").is_dir()  # a distributed (DCP) checkpoint folder
    fit(killed, corpus_path, after, *on, *accumulate(after), "--ckpt_path", str(killed / "checkpoints" / "last.ckpt"))

    expected, got = losses(full), losses(killed)
    assert sorted(expected) == [1, 2, 3, 4] and sorted(got) == [1, 2, 3, 4]
    # GPUs: fla's and FlexAttention's float32 products run on tensor cores (TF32), so rounding differs more
    tolerance = dict(rtol=1e-4, atol=1e-5) if accelerator == "cpu" else dict(rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(
        torch.tensor([got[s] for s in (1, 2, 3, 4)]), torch.tensor([expected[s] for s in (1, 2, 3, 4)]), **tolerance
    )
    assert expected[4] < expected[1]

    # both exports are plain checkpoints of the same trained weights
    a, b = InfiniteVL.from_pretrained(full / "model"), InfiniteVL.from_pretrained(killed / "model")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, **tolerance, msg=name)


LORA_BF16 = (
    CONFIG.replace("ivl.stages.InstructModule", "ivl.stages.LongContextModule")
    .replace('    trainable: [".*"]\n', "    lora_r: 4\n")
    .replace("param_dtype: float32", "param_dtype: bfloat16")
    .replace("max_steps: 4", "max_steps: 2")
)


def test_fsdp_lora_fit_in_bf16_exports_float32_merged_onto_the_bf16_stored_base(tmp_path):
    """Stage III under FSDP2 computing in bf16: the frozen base is stored in bf16 (``store_frozen_in``); the
    export is float32, each frozen weight the bf16 rounding of the converted one, each adapted weight that rounding
    plus the adapter's float32 delta (from the adapter files written beside it)."""
    from safetensors.torch import load_file

    from ivl.stages import lora
    from ivl.stages.models import student_state

    assert "LongContextModule" in LORA_BF16 and "lora_r: 4" in LORA_BF16 and "bfloat16" in LORA_BF16
    data = tmp_path / "data"
    data.mkdir()
    fit(tmp_path, corpus(data, n=4), 2, config=LORA_BF16)
    exported = {}
    for file in sorted((tmp_path / "model").glob("*.safetensors")):
        exported.update(load_file(file))
    assert exported and {t.dtype for t in exported.values()} == {torch.float32}
    adapters = load_file(tmp_path / "model" / "adapter" / lora.ADAPTER_WEIGHTS)
    scale = json.loads((tmp_path / "model" / "adapter" / lora.ADAPTER_CONFIG).read_text())
    scale = scale["lora_alpha"] / scale["r"]
    original = student_state(None, "tiny", 0.25, 64)
    adapted = 0
    for name, tensor in original.items():
        if name not in exported:  # the tied head
            continue
        expected = tensor.to(torch.bfloat16).float()
        a = adapters.get(name.removeprefix("lm.").replace(".weight", ".lora_A.weight"))
        if a is not None:
            b = adapters[name.removeprefix("lm.").replace(".weight", ".lora_B.weight")]
            assert b.abs().sum() > 0, name  # trained: B has left zero
            expected = expected + scale * (b.float() @ a.float())
            adapted += 1
        torch.testing.assert_close(exported[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    assert adapted > 0
    InfiniteVL.from_pretrained(tmp_path / "model")
