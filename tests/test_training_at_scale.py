"""Activation checkpointing and FSDP2 sharding on the CPU: the same gradients, losses and weights as the plain model.

The sharded tests run two processes over gloo (FSDP2 runs on CPU tensors), each holding half of every parameter.
"""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ivl.model import checkpoint
from ivl.model.training import cheap_recompute
from ivl.stages import distributed, lora
from ivl.stages.models import load_student, student_config, student_state


def tiny_student():
    return load_student(None, "tiny", 0.25, 64).train()


def with_random_adapters(model):
    """``model`` with LoRA r = 4 on its language model, B drawn at random (it starts at zero) so the adapters matter."""
    lora.inject(model.lm, lora.lora_config(r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def packed_batch(seed=0, lengths=(40, 1, 57)):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ids = torch.randint(0, 5000, (1, T), generator=g)
    labels = ids.clone()
    labels[:, ::3] = -100
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu}


def loss_of(model, batch):
    return model.head_losses(**batch).ce


@pytest.mark.parametrize("mode", ["blocks", "mixers", 3, 0.75])
def test_activation_checkpointing_gives_identical_gradients_with_packing_and_lora(mode):
    plain = with_random_adapters(tiny_student())
    checkpointed = copy.deepcopy(plain)
    chosen = distributed.checkpoint_blocks(checkpointed.lm, mode)
    assert chosen == {3: [0, 3], 0.75: [1, 2, 3]}.get(mode, [0, 1, 2, 3])

    calls = []
    for i in chosen:
        checkpointed.lm.layers[i].mixer.q_proj.register_forward_hook(lambda *args: calls.append(1))
    batch = packed_batch()
    loss_of(plain, batch).backward()
    loss = loss_of(checkpointed, batch)
    assert len(calls) == len(chosen)
    loss.backward()
    assert len(calls) == 2 * len(chosen)  # the checkpointed mixers ran again in the backward
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in checkpointed.named_parameters()]
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["everything", 0, -2, 0.0, 1.5, True])
def test_unknown_checkpointing_mode_is_refused(mode):
    with pytest.raises(ValueError, match="activation_checkpointing must be one of"):
        distributed.checkpoint_blocks(tiny_student().lm, mode)


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.7, 0.75, 0.9, 0.99])
def test_a_share_of_the_blocks_is_that_many_blocks_spread_evenly(share):
    chosen = distributed.checkpointed_blocks(36, share)
    assert len(chosen) == int(36 * share)
    for start in range(36):  # evenly: every run of w blocks recomputes w * share of them, give or take under one
        for end in range(start + 1, 37):
            inside = sum(start <= i < end for i in chosen)
            assert abs(inside - (end - start) * share) < 1, (start, end)


@pytest.mark.parametrize("share", [0.5, 0.6, 0.67, 0.72, 0.75, 0.8, 0.875, 0.97])
def test_a_share_keeps_attention_blocks_first_each_kind_spread_evenly(share):
    attention = list(range(0, 36, 4))  # infinitevl-4b's layout
    chosen = distributed.checkpointed_blocks(36, share, keep_first=attention)
    kept = [i for i in range(36) if i not in chosen]
    assert len(chosen) == int(36 * share)
    if len(kept) <= len(attention):
        assert set(kept) <= set(attention)
    else:
        assert set(attention) <= set(kept)
    for group in (attention, [i for i in range(36) if i not in attention]):
        picked = [i in kept for i in group]
        rate = sum(picked) / len(group)
        for start in range(len(group)):  # evenly within the group, give or take under one
            for end in range(start + 1, len(group) + 1):
                assert abs(sum(picked[start:end]) - (end - start) * rate) < 1, (group, start, end)


def test_the_students_attention_blocks_are_the_ones_kept_first():
    lm = tiny_student().lm
    attention = [i for i, block in enumerate(lm.layers) if block.layer_type == "attention"]
    assert 0 < len(attention) < len(lm.layers)
    share = 1 - len(attention) / len(lm.layers)
    kept = set(range(len(lm.layers))) - set(distributed.checkpoint_blocks(lm, share))
    assert kept == set(attention)


# ---- two processes ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(fn, *args):
    port = free_port()
    mp.start_processes(_rank_main, args=(fn, port, args), nprocs=2, start_method="spawn")


def _rank_main(rank, fn, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    fn(rank, *args)  # an exception here reaches the test through torch.multiprocessing
    dist.barrier()
    dist.destroy_process_group()
    # gloo's threads can still be winding down; a normal interpreter exit then sometimes aborts in their destructors
    # ("terminate called without an active exception"), after every check has passed.
    os._exit(0)


def sharded_student(rank, checkpointing="blocks", with_lora=False, param_dtype=torch.float32, frozen_in=None):
    """Built the way a stage builds it under FSDP2: meta device, LoRA (only the adapters train), checkpointing,
    frozen parameters stored in ``frozen_in`` (None: left in float32), shard, fill from rank 0."""
    from torch.distributed.device_mesh import init_device_mesh

    with torch.device("meta"):
        from ivl.model import InfiniteVL

        model = InfiniteVL(student_config(None, "tiny", 0.25, 64))
    tied = checkpoint.tied_names(model)
    if with_lora:
        lora.inject(model.lm, lora.lora_config(r=4))
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)
    distributed.checkpoint_blocks(model.lm, checkpointing)
    if frozen_in is not None:
        distributed.store_frozen_in(model, frozen_in)
    distributed.shard(
        model, init_device_mesh("cpu", (2,)), param_dtype=param_dtype, forward_methods=("head_losses", "block_outputs")
    )
    model.to_empty(device="cpu")
    model.reset_buffers()
    state = None
    if rank == 0:
        state = lora.base_layer_names(student_state(None, "tiny", 0.25, 64), set(model.state_dict()))
    distributed.load_full_state(model, state, tied)
    return model


def _check_sharded_step(rank, folder):
    reference = tiny_student()
    # half the blocks kept: their cheap activations are recomputed from the gathered norm weights in the backward
    model = sharded_student(rank, checkpointing=0.5)
    full = distributed.gather_full_state(model)
    if rank == 0:  # loading and gathering round-trip, tied head included
        assert set(full) == set(reference.state_dict())
        for name, tensor in reference.state_dict().items():
            assert torch.equal(full[name], tensor), name
    for (name, a), b in zip(reference.named_buffers(), model.buffers()):  # rebuilt, never loaded
        assert torch.equal(a, b), name

    # One AdamW step, each rank on its own batch, against the plain model stepping on the mean of both losses.
    batches = [packed_batch(seed=s) for s in (1, 2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = loss_of(model, batches[rank])
    recomputed = []
    compute = cheap_recompute._Recipe.compute
    cheap_recompute._Recipe.compute = lambda recipe: recomputed.append(1) or compute(recipe)
    loss.backward()
    cheap_recompute._Recipe.compute = compute
    assert recomputed  # after the kept blocks' weights were freed and gathered again
    optimizer.step()
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    ref_losses = [loss_of(reference, b) for b in batches]
    (sum(ref_losses) / 2).backward()
    ref_optimizer.step()
    torch.testing.assert_close(loss.detach(), ref_losses[rank].detach(), rtol=1e-5, atol=1e-6)
    full = distributed.gather_full_state(model)
    if rank == 0:
        for name, tensor in reference.state_dict().items():
            torch.testing.assert_close(full[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        torch.save({"ok": True}, folder / "done.pt")


def test_sharded_student_loads_steps_and_gathers_like_the_plain_one(tmp_path):
    run_two_ranks(_check_sharded_step, tmp_path)
    assert (tmp_path / "done.pt").exists()


def _check_sharded_lora(rank, folder):
    model = sharded_student(rank, checkpointing="mixers", with_lora=True)
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters"):
            module.reset_lora_parameters(lora.ADAPTER, True)
    full = distributed.gather_full_state(model)
    if rank == 0:
        b = [t for n, t in full.items() if "lora_B" in n]
        a = [t for n, t in full.items() if "lora_A" in n]
        assert b and all(not t.any() for t in b) and all(t.abs().sum() > 0 for t in a)
        reference = tiny_student().state_dict()
        merged, adapters = lora.split_and_merge(full, lora.scalings(model))
        for name, tensor in reference.items():  # B = 0: merging gives back the base weights
            assert torch.equal(merged[name], tensor), name
        assert set(adapters) and all(".default." not in n for n in adapters)


def test_sharded_lora_starts_as_the_base_model(tmp_path):
    run_two_ranks(_check_sharded_lora, tmp_path)


def test_store_frozen_in_moves_exactly_the_parameters_that_do_not_train():
    model = tiny_student()
    lora.inject(model.lm, lora.lora_config(r=4))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    moved = distributed.store_frozen_in(model, torch.bfloat16)
    params = dict(model.named_parameters())
    assert moved and set(moved) == {n for n in params if ".lora_" not in n}
    assert all(p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16) for p in params.values())
    assert distributed.store_frozen_in(model, torch.bfloat16) == []  # nothing left to move


def test_store_frozen_in_keeps_what_will_be_unfrozen_later():
    model = tiny_student().requires_grad_(False)
    later = list(model.visual.parameters())
    moved = set(distributed.store_frozen_in(model, torch.bfloat16, keep=later))
    assert moved == {n for n, _ in model.named_parameters() if not n.startswith("visual.")}
    assert all(p.dtype == torch.float32 for p in later)


def _check_frozen_storage(rank, folder):
    """The same sharded LoRA student with its frozen weights stored in float32 and in bf16, both computing in
    bf16: the same loss and adapter gradients, bit for bit, from frozen shards of half the bytes."""
    results = []
    for frozen_in in (None, torch.bfloat16):
        model = sharded_student(
            rank, checkpointing="mixers", with_lora=True, param_dtype=torch.bfloat16, frozen_in=frozen_in
        )
        torch.manual_seed(0)  # the same adapters in both (B nonzero, so that A's gradient is not zero either)
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                with torch.no_grad():
                    p.to_local().copy_(torch.randn(p.to_local().shape) * 0.1)
        loss = loss_of(model, packed_batch(seed=rank + 1))
        loss.backward()
        frozen = [p for p in model.parameters() if not p.requires_grad]
        grads = {n: p.grad.to_local().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append(
            (loss.detach(), grads, {p.to_local().dtype for p in frozen}, sum(p.to_local().nbytes for p in frozen))
        )
    (loss32, grads32, dtypes32, bytes32), (loss16, grads16, dtypes16, bytes16) = results
    assert dtypes32 == {torch.float32} and dtypes16 == {torch.bfloat16} and bytes16 * 2 == bytes32
    assert torch.equal(loss32, loss16)
    assert grads32.keys() == grads16.keys() and grads32
    for name in grads32:
        assert grads32[name].dtype == torch.float32 and torch.equal(grads32[name], grads16[name]), name
    if rank == 0:
        torch.save({"ok": True}, folder / "done.pt")


def test_frozen_weights_stored_in_bf16_compute_exactly_as_float32_ones(tmp_path):
    run_two_ranks(_check_frozen_storage, tmp_path)
    assert (tmp_path / "done.pt").exists()
