"""The inference benchmark runs end to end at tiny shapes on the CPU (its numbers come from GPU runs)."""

import argparse
import json

import pytest

from ivl.bench import inference
from ivl.model.mixers import LINEAR_MIXERS


def test_inference_bench_smoke(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    inference.add_arguments(parser)
    args = parser.parse_args(
        [
            "--shapes",
            "tiny",
            "--device",
            "cpu",
            "--contexts",
            "32",
            "96",
            "--batch",
            "1",
            "--decode-tokens",
            "3",
            "--decoder",
            "static",
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    inference.run(args)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 4  # header, rule, 2 models x 2 contexts (no CUDA-graph baseline on the CPU)
    assert (tmp_path / "p.png").stat().st_size > 0


def test_inference_bench_times_each_linear_mixer(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    inference.add_arguments(parser)
    args = parser.parse_args(
        [
            "--shapes",
            "tiny",
            "--device",
            "cpu",
            "--contexts",
            "32",
            "--batch",
            "1",
            "--decode-tokens",
            "3",
            "--decoder",
            "static",
            "--baseline-max-context",
            "0",
            "--linear-mixers",
            "mamba2",
            "gla",
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    inference.run(args)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| InfiniteVL")]
    assert [r.split("|")[1].strip() for r in rows] == ["InfiniteVL (mamba2)", "InfiniteVL (gla)"]
    assert not any("Qwen" in r for r in rows)


def _stream_args(tmp_path, *extra):
    from ivl.bench import stream

    parser = argparse.ArgumentParser()
    stream.add_arguments(parser)
    return parser.parse_args(
        [
            "--shapes",
            "tiny",
            "--device",
            "cpu",
            "--frame-size",
            "56",
            "--sample-every",
            "4",
            "--plot",
            str(tmp_path / "s.png"),
            *extra,
        ]
    )


def test_stream_bench_smoke(tmp_path, capsys):
    from ivl.bench import stream

    stream.run(_stream_args(tmp_path, "--frames", "10", "--frames-per-step", "4"))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    # whole steps of 4 frames covering at least the 10 asked for: both models ingest 12
    assert len(rows) == 2 + 2 and all("| 12 |" in row for row in rows[2:])
    assert (tmp_path / "s.png").stat().st_size > 0


def test_baseline_static_decoder_equals_transformers_decoding():
    """The baseline 'at its best' decodes what transformers' own cached decoding does, token by token."""
    import torch
    from references import assert_as_accurate, float64
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ivl.bench.hf_cache import cache_of, with_cache
    from ivl.teachers.qwen2_5_vl import TINY_TEACHER

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TINY_TEACHER)).eval()
    ids = torch.randint(0, 200, (2, 9))
    exact_model = float64(model)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        exact_past = cache_of(exact_model(input_ids=ids, use_cache=True))
        step = inference.BaselineStaticDecoder(model, cache_of(out), 9, 14, cuda_graph=False)
        token, past = out.logits[:, -1].argmax(-1), cache_of(out)
        for s in range(4):
            logits = step(token, 9 + s)
            out = model(input_ids=token[:, None], **with_cache(past), use_cache=True)
            exact = exact_model(input_ids=token[:, None], **with_cache(exact_past), use_cache=True)
            past, exact_past = cache_of(out), cache_of(exact)
            assert_as_accurate(logits, out.logits[:, -1], exact.logits[:, -1])
            token = logits.argmax(-1)


def test_stream_bench_keeps_what_it_measured_when_interrupted(tmp_path, capsys, monkeypatch):
    """A SIGTERM (a `timeout`) mid-stream ends that stream with its row and plot; the baseline is skipped."""
    import os
    import signal

    from ivl.bench import stream

    real = stream._positions
    calls = {"n": 0}

    def positions_then_sigterm(step, *rest):
        calls["n"] += 1
        if step == 2 and calls["n"] > 3:  # the third timed step (after the untimed warm-up steps)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *rest)

    monkeypatch.setattr(stream, "_positions", positions_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    stream.run(_stream_args(tmp_path, "--frames", "12", "--frames-per-step", "2"))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[2].startswith("| InfiniteVL | 4 (interrupted) |")
    assert (tmp_path / "s.png").stat().st_size > 0
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was the run's only


@pytest.mark.parametrize("linear_mixer", LINEAR_MIXERS)
def test_gemv_bench_times_every_matrix_a_decode_step_reads(linear_mixer, monkeypatch):
    """The shapes ``ivl.bench gemv`` times are the matrices a decode step multiplies, packed as it reads them, with
    their counts: every product the step sends to ``linear``, whichever linear mixer the model runs."""
    import sys
    from collections import Counter

    import torch

    from ivl.bench.gemv import decode_shapes
    from ivl.model import HybridConfig, HybridLM
    from ivl.model.decoding import static_cache

    config = HybridConfig.tiny(num_layers=6, attention_bias=False, linear_mixer=linear_mixer)
    lm = HybridLM(config)
    read = Counter()
    for module in {static_cache, *(sys.modules[type(block.mixer).step.__module__] for block in lm.layers)}:

        def recording(x, weight, bias=None, _linear=module.linear):
            read[tuple(weight.shape)] += 1
            return _linear(x, weight, bias)

        monkeypatch.setattr(module, "linear", recording)
    with torch.no_grad():
        static_cache.decode_step(
            lm,
            static_cache.StaticCache(lm, 1),
            torch.tensor([1]),
            torch.zeros(3, 1, 1, dtype=torch.long),
            torch.tensor(0),
        )
    timed = Counter()
    for _, rows, cols, count in decode_shapes(config):
        timed[rows, cols] += count
    assert timed == read


def test_train_bench_smoke(capsys):
    """Every case through the real stage modules and the Transformer baseline, FSDP2 on one CPU process."""
    from ivl.bench import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(
        [
            "--shapes",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--lengths",
            "48",
            "--checkpointing",
            "mixers",
        ]
    )
    train.run(args)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| stage")]
    # 4 cases x 2 models, less the layer-wise phase's (it has no Transformer analogue)
    assert len(rows) == 7 and all("OOM" not in r and r.count("|") == 12 for r in rows)


def test_train_bench_profiles_a_step_and_runs_each_checkpointing_mode(tmp_path, capsys):
    from ivl.bench import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(
        [
            "--shapes",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--cases",
            "stage2",
            "--models",
            "infinitevl",
            "--lengths",
            "48",
            "--checkpointing",
            "off",
            "0.75",
            "--keep-gathered",
            "--profile",
            str(tmp_path),
        ]
    )
    train.run(args)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| stage")]
    assert [r.split("|")[5].strip() for r in rows] == ["off, kept gathered", "0.75, kept gathered"]
    traces = sorted(p.name for p in tmp_path.glob("*.json.gz"))
    assert traces == [
        "stage2-infinitevl-48-1gpu-ckpt0.75-kept-rank0.json.gz",
        "stage2-infinitevl-48-1gpu-ckptoff-kept-rank0.json.gz",
    ]


def test_host_bench_smoke(capsys):
    from ivl.bench import host

    parser = argparse.ArgumentParser()
    host.add_arguments(parser)
    host.run(
        parser.parse_args(["--shapes", "tiny", "--device", "cpu", "--length", "64", "--iters", "1", "--layers", "2"])
    )
    assert "2 layers (attention, gated_deltanet), forward + backward at 64 tokens" in capsys.readouterr().out


def test_train_bench_flops_count_the_4b_matrices():
    """The FLOP model's parameter count at 4B shapes, against the paper's layer sizes worked out by hand."""
    import torch

    from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig
    from ivl.model.mixers.attention import mean_keys_seen
    from ivl.stages.flops import hybrid_flops

    with torch.device("meta"):
        model = InfiniteVL(InfiniteVLConfig(text=HybridConfig.preset("infinitevl-4b"), vision={"depth": 1}))
    mlp = 3 * 2048 * 11008
    attention = 2048 * 2048 * 2 + 2048 * 256 * 2  # q, o; k, v (2 key/value heads of 128)
    gdn = 2048 * 2048 * 2 + 2048 * 4096 * 3 + 2048 * 16 * 2  # q, k; v, g, o; a, b
    matrices = 36 * mlp + 9 * attention + 27 * gdn + 151936 * 2048  # + the (tied) head
    flops = hybrid_flops(model, 4096)
    core = flops.forward - 2 * matrices
    assert 0 < core < 0.05 * flops.forward  # the mixers' cores are a few percent at 4K
    assert flops.backward == 2 * flops.forward  # everything trainable: input and weight gradients
    assert mean_keys_seen(4, None) == (1 + 2 + 3 + 4) / 4 and mean_keys_seen(5, 2) == (1 + 2 + 2 + 2 + 2) / 5


@pytest.mark.parametrize("mixer", LINEAR_MIXERS)
def test_flops_count_each_linear_mixer_by_its_own_core(mixer):
    """Per token, a linear mixer's core stops growing once sequences pass a chunk (a fixed-size state), the windowed
    attention's once they pass the window."""
    import torch

    from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig
    from ivl.stages.flops import hybrid_flops

    text = HybridConfig.preset("infinitevl-4b", linear_mixer=mixer, window=1024)
    with torch.device("meta"):
        model = InfiniteVL(InfiniteVLConfig(text=text, vision={"depth": 1}))
    linear = [i for i, kind in enumerate(text.layer_types) if kind == mixer]
    attention = [i for i, kind in enumerate(text.layer_types) if kind == "attention"]

    def core(blocks, n):
        weights = sum(p.numel() for i in blocks for p in model.lm.layers[i].parameters() if p.dim() == 2)
        return hybrid_flops(model, n, blocks=blocks, head=False).forward - 2 * weights

    assert 0 < core(linear, 128) == pytest.approx(core(linear, 2048)) == pytest.approx(core(linear, 32768))
    assert 0 < core(attention, 128) < core(attention, 2048) < core(attention, 32768)
    assert core(attention, 10**7) == pytest.approx(len(attention) * 4 * 2048 * 1024, rel=1e-3)  # 16 heads of 128


def test_each_mixers_flops_follow_what_torch_counts_when_it_runs():
    """torch's FlopCounterMode over a forward of the pure-PyTorch path (every layer one mixer) is the independent
    count. The model's per-token FLOPs minus two per weight (the core) must rank the mixers as the counted cores
    do, match Gated DeltaNet's (whose CPU path is the same chunked algorithm as fla's kernel) within 10%, and for
    the others at least cover what runs here (fla's chunked kernels do more products than these CPU forms)."""
    from types import SimpleNamespace

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ivl.model import HybridConfig
    from ivl.model.lm import HybridLM
    from ivl.stages.flops import hybrid_flops

    length, counted, modelled = 128, {}, {}
    for mixer in LINEAR_MIXERS:
        text = HybridConfig.tiny(linear_mixer=mixer, layer_types=[mixer] * 4)
        model = SimpleNamespace(config=SimpleNamespace(text=text), lm=HybridLM(text).eval())  # no vision tower
        weights = sum(p.numel() for block in model.lm.layers for p in block.parameters() if p.dim() == 2)
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model.lm.hidden_states(input_ids=torch.randint(0, text.vocab_size, (1, length)))
        counted[mixer] = flops.get_total_flops() / length - 2 * weights
        modelled[mixer] = hybrid_flops(model, length, head=False).forward - 2 * weights
    assert sorted(LINEAR_MIXERS, key=counted.get) == sorted(LINEAR_MIXERS, key=modelled.get)
    assert modelled["gated_deltanet"] == pytest.approx(counted["gated_deltanet"], rel=0.1)
    assert all(counted[m] <= modelled[m] <= 2 * counted[m] for m in LINEAR_MIXERS), (counted, modelled)


def test_flops_of_a_batch_are_each_sequences_tokens_at_that_sequences_cost():
    """Packed, padded and full-row batches; attention's core depends on each sequence's own length."""
    import torch

    from ivl.model import HybridConfig, InfiniteVL, InfiniteVLConfig
    from ivl.stages.flops import hybrid_batch_flops, hybrid_flops, sequence_lengths

    with torch.device("meta"):
        model = InfiniteVL(InfiniteVLConfig(text=HybridConfig.preset("infinitevl-4b"), vision={"depth": 1}))
    packed = {"input_ids": torch.zeros(1, 10), "cu_seqlens": torch.tensor([0, 3, 10], dtype=torch.int32)}
    padded = {"input_ids": torch.zeros(2, 7), "attention_mask": torch.tensor([[1] * 3 + [0] * 4, [1] * 7])}
    assert sequence_lengths(packed) == sequence_lengths(padded) == [3, 7]
    assert sequence_lengths({"input_ids": torch.zeros(2, 5)}) == [5, 5]
    batch = hybrid_batch_flops(model, [3, 7])
    each = [hybrid_flops(model, n) for n in (3, 7)]
    assert batch.total == pytest.approx(3 * each[0].total + 7 * each[1].total)
    assert each[0].forward < each[1].forward  # more keys per query in the longer sequence


def test_data_bench_scale_mode_smoke(tmp_path, capsys):
    from ivl.bench import data

    parser = argparse.ArgumentParser()
    data.add_arguments(parser)
    data.run(
        parser.parse_args(
            [
                "--corpus",
                "-",
                "--scale",
                "300",
                "--video-minutes",
                "0.05",
                "--workers",
                "0",
                "--batches",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
    )
    out = capsys.readouterr().out
    assert "| first (counts lengths, writes the cache) |" in out and "| second (reads the cache) |" in out
    assert "sampled 6 frames of the 0.05-minute video" in out  # 3 s at 2 fps
    assert list((tmp_path / ".ivl-cache").glob("lengths-*.json"))


def test_serve_bench_smoke(tmp_path, capsys, monkeypatch):
    """Both servers started, loaded by concurrent clients and by Poisson arrivals of mixed prompts, a live session
    measured (tiny models, CPU)."""
    monkeypatch.chdir(tmp_path)  # away from a demo model trained in the repository (runs/demo/model)
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ivl.bench import serve
    from ivl.data.processing import Processor
    from ivl.teachers.qwen2_5_vl import TINY_TEACHER

    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration._from_config(Qwen2_5_VLConfig(**TINY_TEACHER)).save_pretrained(tmp_path / "t")
    Processor.from_pretrained().save_pretrained(tmp_path / "t")
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    serve.run(
        parser.parse_args(
            [
                "--baseline",
                str(tmp_path / "t"),
                "--device",
                "cpu",
                "--clients",
                "1",
                "2",
                "--requests",
                "2",
                "--max-tokens",
                "4",
                "--image-size",
                "56",
                "--frames",
                "4",
                "--frame-size",
                "56",
                "--frames-per-push",
                "2",
                "4",
                "--rates",
                "50",
                "--mixed-requests",
                "4",
                "--mixed-prompt",
                "5",
                "60",
                "--mixed-new",
                "1",
                "3",
                "--max-context",
                "512",
                "--out",
                str(tmp_path / "rows.jsonl"),
            ]
        )
    )
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    baseline = "Qwen2.5-VL (same engine)"
    closed = [r for r in rows if "clients" in r]
    mixed = [r for r in rows if "rate" in r]
    sessions = [r for r in rows if "frames" in r]
    assert [(r["server"], r["clients"]) for r in closed] == [
        ("InfiniteVL", 1),
        ("InfiniteVL", 2),
        (baseline, 1),
        (baseline, 2),
    ]
    assert [(r["server"], r["rate"]) for r in mixed] == [("InfiniteVL", 50), (baseline, 50)]
    assert len(rows) == len(closed) + len(mixed) + len(sessions) and len(sessions) == 2
    assert all(r["requests"] == 2 * r["clients"] and r["ttft_p50_s"] <= r["latency_p50_s"] for r in closed)
    assert all(r["tokens_per_request"] <= 4 and r["itl_p50_ms"] <= r["itl_p99_ms"] for r in closed)
    assert all(r["requests"] == 4 and 1 <= r["tokens_per_request"] <= 3 and r["prompt_tokens_mean"] > 5 for r in mixed)
    assert [(r["frames"], r["frames_per_push"]) for r in sessions] == [(4, 2), (4, 4)]
    assert sessions[0]["cache_kib_first"] == sessions[0]["cache_kib_last"]
    assert "live session (InfiniteVL)" in out and "| 50 |" in out


def test_the_decode_roofline_counts_weights_once_and_state_per_slot(tmp_path):
    """The bytes a decode step reads, against the teacher's config counted by hand: the baseline's grow by every
    layer's keys and values (bf16) and ring bookkeeping (a position, a flag) per token of context and slot;
    InfiniteVL's do not grow with context at all, and its weights are the converted model's own."""
    import torch
    from transformers import Qwen2_5_VLConfig

    from ivl.bench.serve import decode_bytes
    from ivl.model import convert_qwen2_5_vl
    from ivl.teachers.qwen2_5_vl import TINY_TEACHER

    config = Qwen2_5_VLConfig(**TINY_TEACHER)
    config.save_pretrained(tmp_path / "t")
    text = config.text_config
    per_token = text.num_hidden_layers * (
        2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2 + 8 + 1
    )
    assert decode_bytes(tmp_path / "t", True, 3, 101) - decode_bytes(tmp_path / "t", True, 3, 100) == 3 * per_token
    from transformers import Qwen2_5_VLForConditionalGeneration

    student, _ = convert_qwen2_5_vl(Qwen2_5_VLForConditionalGeneration._from_config(config), dtype=torch.bfloat16)
    student.save_pretrained(tmp_path / "s")
    weights = sum(p.numel() * 2 for p in student.lm.parameters())
    assert decode_bytes(tmp_path / "s", False, 1, 100) == decode_bytes(tmp_path / "s", False, 1, 5000)
    assert (
        decode_bytes(tmp_path / "s", False, 2, 100) - decode_bytes(tmp_path / "s", False, 1, 100)
        == decode_bytes(tmp_path / "s", False, 1, 100) - weights
    )


def test_serve_bench_in_process_times_each_decoder_on_random_weights(tmp_path):
    """--random writes a converted student and its teacher once (tiny on the CPU); --in-process times the engine
    per batch size without a server."""
    from ivl.bench import serve
    from ivl.model import InfiniteVL

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = [
        "--random",
        str(tmp_path / "m"),
        "--device",
        "cpu",
        "--in-process",
        "--clients",
        "1",
        "3",
        "--max-tokens",
        "4",
        "--image-size",
        "56",
        "--out",
        str(tmp_path / "rows.jsonl"),
    ]
    serve.run(parser.parse_args(args))
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["decoder"], r["batch"]) for r in rows] == [("static", 1), ("static", 3)]
    assert all(r["first_token_s"] > 0 and r["ms_per_step"] > 0 for r in rows)
    student = InfiniteVL.from_pretrained(tmp_path / "m" / "infinitevl")
    assert student.config.vision is not None and (tmp_path / "m" / "qwen2.5-vl" / "tokenizer.json").exists()
    written = (tmp_path / "m" / "infinitevl" / "config.json").stat().st_mtime
    serve.run(parser.parse_args(args))  # the folders are reused, not written again
    assert (tmp_path / "m" / "infinitevl" / "config.json").stat().st_mtime == written


def test_train_bench_packs_several_sequences_per_step_as_the_stages_do():
    """--sequences N: InfiniteVL's stages II and III get one packed row with N sequences' boundaries; the
    distillation stage and the Transformer a batch of N rows; in both, each sequence's first half is prompt."""
    from ivl.bench.train import synthetic_batches

    packed = synthetic_batches("stage2", "infinitevl", 6, 100, count=1, sequences=3)[0]
    rows = synthetic_batches("stage2", "transformer", 6, 100, count=1, sequences=3)[0]
    distill = synthetic_batches("stage1-kl", "infinitevl", 6, 100, count=1, sequences=3)[0]
    assert packed["input_ids"].shape == (1, 18) and packed["cu_seqlens"].tolist() == [0, 6, 12, 18]
    assert len(packed["sources"]) == len(packed["tasks"]) == 3
    assert rows["input_ids"].shape == distill["input_ids"].shape == distill["attention_mask"].shape == (3, 6)
    assert "cu_seqlens" not in rows and "cu_seqlens" not in distill
    assert packed["input_ids"].flatten().tolist() == rows["input_ids"].flatten().tolist()
    for labels in (packed["labels"].reshape(3, 6), rows["labels"]):
        assert (labels[:, :3] == -100).all() and (labels[:, 3:] >= 0).all()


def test_train_bench_counts_every_packed_sequence(capsys):
    from ivl.bench import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(
        [
            "--shapes",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--cases",
            "stage2",
            "--models",
            "infinitevl",
            "--lengths",
            "32",
            "--sequences",
            "2",
        ]
    )
    train.run(args)
    row = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert row["sequences"] == 2 and row["tokens_per_s_per_gpu"] == 64 / row["step_s"]


def test_adamw_is_fused_only_where_every_parameter_is_on_a_gpu():
    import torch

    from ivl.stages.base import adamw

    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert not adamw(cpu).defaults["fused"]
    assert not adamw([{"params": cpu, "weight_decay": 0.0}], lr=1e-3).defaults["fused"]
    if torch.cuda.is_available():
        assert adamw([torch.nn.Parameter(torch.zeros(2, device="cuda"))]).defaults["fused"]
