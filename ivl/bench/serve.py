"""Serving under load, through the OpenAI endpoint of ``python -m ivl.serve``, for InfiniteVL and (``--baseline``) a
Qwen2.5-VL served by the same engine (every layer full attention, static KV, CUDA graphs, continuous batching).

Closed loop: ``--clients`` clients each send ``--requests`` streamed requests back to back (one ``--image-size``
image and the same question, greedy, ``--max-tokens`` new tokens). Mixed load: ``--mixed-requests`` requests at
Poisson arrivals per ``--rates`` value (requests/s); prompts of 50 to 8K words (about one token each, log-uniform),
half with an image, 1 to 512 new tokens. Each row gives generated tokens/s, requests/s, time to the first token
and the inter-token latency (p50, p99; the gap between streamed chunks), and for the closed loop the fraction of
the decode roofline: the tokens/s at which one decode step per token, over that many slots, would read the
weights and every slot's state (or KV) once at the device's measured bandwidth. A live video session pushes
``--frames`` frames and asks one question at the end.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime
import io
import json
import math
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from ivl.serve.launch import running_server

QUESTION = "Describe the picture in one sentence."
WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health"
).split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="the InfiniteVL folder (default: as lightning_app.py)")
    parser.add_argument("--baseline", default=None, help="a Qwen2.5-VL folder served the same way, for reference")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=4, help="requests per client (closed loop)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[2.0, 8.0],
        help="mixed load: Poisson arrival rates (requests/s), a row each; none: no mixed load",
    )
    parser.add_argument("--mixed-requests", type=int, default=64, help="requests per mixed-load rate")
    parser.add_argument(
        "--mixed-prompt",
        type=int,
        nargs=2,
        default=[50, 8192],
        metavar=("MIN", "MAX"),
        help="mixed load: prompt words (about one token each), log-uniform",
    )
    parser.add_argument(
        "--mixed-new",
        type=int,
        nargs=2,
        default=[1, 512],
        metavar=("MIN", "MAX"),
        help="mixed load: max_tokens, uniform",
    )
    parser.add_argument("--step-budget", type=int, default=None, help="the servers' --step-budget (default: theirs)")
    parser.add_argument("--max-context", type=int, default=9216, help="the servers' --max-context (the baseline's KV)")
    parser.add_argument("--frames", type=int, default=200, help="frames pushed into the live session")
    parser.add_argument("--frame-size", type=int, default=448)
    parser.add_argument(
        "--frames-per-push",
        type=int,
        nargs="+",
        default=[2],
        help="frames per push call (one temporal patch is 2): a row per value",
    )
    parser.add_argument(
        "--random",
        type=Path,
        default=None,
        metavar="DIR",
        help="serve random weights at the 4B shapes (tiny with --device cpu), written to DIR once: "
        "InfiniteVL converted from a Qwen2.5-VL-3B-shaped teacher, and that teacher as baseline",
    )
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["infinitevl", "baseline"],
        choices=["infinitevl", "baseline"],
        help="which servers to measure (the baseline needs --baseline or --random)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="no server: time the engine per decoder and batch size (first token, ms per step)",
    )
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per measurement")


def _png(size: int, seed: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, 120)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body(text: str, image: str | None, max_tokens: int) -> dict:
    content = ([{"type": "image_url", "image_url": {"url": image}}] if image else []) + [{"type": "text", "text": text}]
    return {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _one_request(url: str, body: dict) -> dict:
    """Seconds to the first text chunk and to the end, the gaps between text chunks, and the usage of one streamed
    request."""
    start, stamps, usage = time.perf_counter(), [], {}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter() - start)
    end = time.perf_counter() - start
    return {
        "ttft": stamps[0] if stamps else end,
        "latency": end,
        "gaps": np.diff(stamps).tolist(),
        "tokens": usage.get("completion_tokens", 0),
        "prompt_tokens": usage.get("prompt_tokens", 0),
    }


def _percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(results: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "tokens_per_request": statistics.mean(r["tokens"] for r in results),
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in results),
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p99_s": _percentile(ttft, 99),
        "itl_p50_ms": 1e3 * _percentile(gaps, 50),
        "itl_p99_ms": 1e3 * _percentile(gaps, 99),
        "latency_p50_s": _percentile([r["latency"] for r in results], 50),
    }


def closed_loop(url: str, clients: int, per_client: int, max_tokens: int, image_size: int) -> dict:
    body = _body(QUESTION, _png(image_size, clients), max_tokens)

    def client(count: int):
        return [_one_request(url, body) for _ in range(count)]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [1] * clients))  # warm-up round: compilation and CUDA graphs of these sizes
        start = time.perf_counter()
        results = [r for rs in pool.map(client, [per_client] * clients) for r in rs]
    return {"clients": clients, **summarize(results, time.perf_counter() - start)}


def mixed_load(
    url: str, rate: float, count: int, prompt: tuple[int, int], new: tuple[int, int], image_size: int, seed: int = 0
) -> dict:
    """``count`` requests arriving as a Poisson process of ``rate`` per second, each sent at its arrival time."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, count))
    lengths = np.exp(rng.uniform(math.log(prompt[0]), math.log(prompt[1]), count)).astype(int)
    bodies = [
        _body(
            " ".join(rng.choice(WORDS, n)) + "\nSummarise.",
            _png(image_size, i) if i % 2 else None,
            int(rng.integers(new[0], new[1] + 1)),
        )
        for i, n in enumerate(lengths)
    ]
    results: list[dict | None] = [None] * count
    start = time.perf_counter()

    def send(i: int) -> None:
        time.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
        results[i] = _one_request(url, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rate": rate, **summarize(results, time.perf_counter() - start)}


def session(url: str, frames: int, frame_size: int, per_push: int = 2) -> dict:
    call = lambda body: requests.post(f"{url}/v1/sessions", json=body, timeout=600).json()  # noqa: E731
    sid = call({"op": "open"})["session"]
    batch = [_png(frame_size, i) for i in range(per_push)]
    for _ in range(3):  # warm-up pushes
        call({"op": "push", "session": sid, "frames": batch})
    times, sizes = [], []
    for _ in range(max(frames // per_push, 1)):
        start = time.perf_counter()
        pushed = call({"op": "push", "session": sid, "frames": batch})
        times.append((time.perf_counter() - start) / per_push)
        sizes.append(pushed["cache_bytes"])
    asks = []
    for _ in range(2):  # the first answer also captures the session decoder
        start = time.perf_counter()
        call({"op": "ask", "session": sid, "question": "What happened?", "max_tokens": 16, "temperature": 0})
        asks.append(time.perf_counter() - start)
    call({"op": "close", "session": sid})
    return {
        "frames": per_push * len(times),
        "frames_per_push": per_push,
        "per_frame_p50_ms": 1e3 * _percentile(times, 50),
        "per_frame_p99_ms": 1e3 * _percentile(times, 99),
        "ask_first_s": asks[0],
        "ask_s": asks[1],
        "cache_kib_first": sizes[0] / 2**10,
        "cache_kib_last": sizes[-1] / 2**10,
    }


def decode_bytes(folder: str, baseline: bool, batch: int, context: int) -> int:
    """Bytes one decode step over ``batch`` slots must read at least: the language model's weights (a tied
    embedding once) and each slot's state, for the baseline its keys and values up to ``context``. Counted on the
    meta device from the folder's config."""
    import torch

    from ivl.model import InfiniteVL
    from ivl.model.decoding.static_cache import StaticCache

    with torch.device("meta"):
        if baseline:
            from transformers import Qwen2_5_VLConfig

            from ivl.model.convert import student_config

            config = student_config(Qwen2_5_VLConfig.from_pretrained(folder), hybrid_ratio=1.0, window=None)
        else:
            from ivl.model import InfiniteVLConfig
            from ivl.model.checkpoint import read_config

            config = InfiniteVLConfig.from_dict(read_config(folder)[0])
        model = InfiniteVL(config)
        model.to(torch.bfloat16)
        state = StaticCache(model.lm, batch, device="meta", ring=context).nbytes()
    weights = sum(p.numel() * p.element_size() for p in model.lm.parameters())
    return weights + state


def _roofline(row: dict, folder: str, baseline: bool, bandwidth: float) -> dict:
    if bandwidth != bandwidth:
        return {}
    B = row["clients"]
    context = int(row["prompt_tokens_mean"] + row["tokens_per_request"] / 2)
    bound = B * bandwidth / decode_bytes(folder, baseline, B, context)
    return {"roofline_tokens_per_s": bound, "roofline_fraction": row["tokens_per_s"] / bound}


def random_models(folder: Path, device: str) -> tuple[Path, Path]:
    """(InfiniteVL folder, Qwen2.5-VL folder) of random bf16 weights at the 4B shapes (tiny on the CPU), with the
    bundled tokenizer; written once."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ivl.data.processing import Processor
    from ivl.model import convert_qwen2_5_vl
    from ivl.teachers.qwen2_5_vl import QWEN2_5_VL_3B, TINY_TEACHER

    student, teacher_dir = folder / "infinitevl", folder / "qwen2.5-vl"
    if (student / "config.json").exists() and (teacher_dir / "config.json").exists():
        return student, teacher_dir
    config = Qwen2_5_VLConfig(**(TINY_TEACHER if device == "cpu" else QWEN2_5_VL_3B))
    torch.manual_seed(0)
    with torch.device(device):
        teacher = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    converted, _ = convert_qwen2_5_vl(teacher, dtype=torch.bfloat16, device=device)
    processor = Processor.from_pretrained()
    for model, out in ((teacher, teacher_dir), (converted, student)):
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return student, teacher_dir


def in_process(args: argparse.Namespace) -> list[dict]:
    """The engine without the server: seconds to the first token and ms per decode step per batch size, replayed
    from CUDA graphs (on CUDA) and eager."""
    import torch

    from ivl.serve.engine import ChatEngine, Prompt, Sampling
    from ivl.serve.loading import load as load_model

    model, processor, _ = load_model(args.model, args.device, args.dtype if args.device != "cpu" else None)
    image = Image.open(io.BytesIO(base64.b64decode(_png(args.image_size, 0).split(",", 1)[1]))).convert("RGB")
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def generate(chat, batch, tokens):
        prompts = [Prompt(text, images=[image], sampling=Sampling(max_tokens=tokens)) for _ in range(batch)]
        sync()
        start, first, steps = time.perf_counter(), None, 0
        for _ in chat.generate(prompts):
            first = first if first is not None else time.perf_counter() - start
            steps += 1
        sync()
        return first, (time.perf_counter() - start - first) / max(steps - 1, 1)

    rows = []
    for decoder in (["cuda_graph"] if args.device == "cuda" else []) + ["static"]:
        chat = ChatEngine(model, processor, capacity=max(args.clients), decoder=decoder, max_context=args.max_context)
        for batch in args.clients:
            generate(chat, batch, 4)  # compilation, capture of this batch size
            first, step = generate(chat, batch, args.max_tokens)
            rows.append({"decoder": decoder, "batch": batch, "first_token_s": first, "ms_per_step": 1e3 * step})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| decoder | batch | first token s | ms per decode step |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['decoder']} | {r['batch']} | {r['first_token_s']:.3f} | {r['ms_per_step']:.2f} |")
    return rows


def _bandwidth(device: str) -> float:
    if not device.startswith("cuda"):
        return float("nan")
    import torch

    from ivl.bench.inference import hbm_bandwidth

    measured = hbm_bandwidth(device)
    torch.cuda.empty_cache()  # the servers get the memory back
    return measured


def _write(path: Path | None, rows: list[dict], device: str) -> None:
    if path:
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, "device": device, "date": str(datetime.date.today())}) + "\n")


def run(args: argparse.Namespace) -> None:
    if args.random is not None:
        student, teacher = random_models(args.random, args.device)
        args.model, args.baseline = str(student), args.baseline or str(teacher)
    if args.in_process:
        _write(args.out, in_process(args), args.device)
        return
    bandwidth = _bandwidth(args.device)
    rows, mixed, sessions = [], [], []
    servers = ([("InfiniteVL", args.model, False)] if "infinitevl" in args.servers else []) + (
        [("Qwen2.5-VL (same engine)", args.baseline, True)] if args.baseline and "baseline" in args.servers else []
    )
    common = [
        "--device",
        args.device,
        "--max-batch-size",
        str(max(args.clients)),
        "--max-tokens",
        str(max(args.max_tokens, 16, args.mixed_new[1])),
        "--max-context",
        str(args.max_context),
    ] + (["--dtype", args.dtype] if args.device != "cpu" else [])
    common += ["--step-budget", str(args.step_budget)] if args.step_budget else []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder, baseline in servers:
            flag = ["--baseline", folder] if baseline else (["--model", folder] if folder else [])
            with running_server(*flag, *common, log_path=Path(tmp) / "server.log", timeout=900) as (url, _):
                for clients in args.clients:
                    row = {"server": name, **closed_loop(url, clients, args.requests, args.max_tokens, args.image_size)}
                    if folder:
                        row.update(_roofline(row, folder, baseline, bandwidth))
                    rows.append(row)
                    _write(args.out, [row], args.device)
                    print(json.dumps(row), flush=True)
                for rate in args.rates if args.mixed_requests > 0 else []:
                    mixed.append(
                        {
                            "server": name,
                            **mixed_load(
                                url, rate, args.mixed_requests, args.mixed_prompt, args.mixed_new, args.image_size
                            ),
                        }
                    )
                    _write(args.out, mixed[-1:], args.device)
                    print(json.dumps(mixed[-1]), flush=True)
                for per_push in args.frames_per_push if not baseline and args.frames else []:
                    sessions.append({"server": name, **session(url, args.frames, args.frame_size, per_push)})
                    _write(args.out, sessions[-1:], args.device)
                    print(json.dumps(sessions[-1]), flush=True)
    print(
        f"\n# {args.device} | {datetime.date.today()} | closed loop: {args.max_tokens} new tokens, one "
        f"{args.image_size}x{args.image_size} image per request, {args.requests} requests per client; "
        f"measured bandwidth {bandwidth / 1e12:.2f} TB/s\n"
    )
    print(
        "| server | clients | tokens/s | requests/s | tokens/request | TTFT p50 / p99 s | ITL p50 / p99 ms | "
        "decode roofline tokens/s (fraction) |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        bound = f"{r['roofline_tokens_per_s']:,.0f} ({r['roofline_fraction']:.0%})" if "roofline_fraction" in r else ""
        print(
            f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:,.0f} | {r['requests_per_s']:.2f} | "
            f"{r['tokens_per_request']:.1f} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {bound} |"
        )
    if mixed:
        print(
            f"\nmixed load: {args.mixed_requests} requests per rate, prompts of {args.mixed_prompt[0]}-"
            f"{args.mixed_prompt[1]} words (half with an image), {args.mixed_new[0]}-{args.mixed_new[1]} new tokens\n"
        )
        print(
            "| server | arrivals/s | tokens/s | requests/s | prompt tokens (mean) | TTFT p50 / p99 s | "
            "ITL p50 / p99 ms | ITL p99 / p50 |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
        )
        for r in mixed:
            print(
                f"| {r['server']} | {r['rate']:g} | {r['tokens_per_s']:,.0f} | {r['requests_per_s']:.2f} | "
                f"{r['prompt_tokens_mean']:,.0f} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
                f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['itl_p99_ms'] / r['itl_p50_ms']:.1f} |"
            )
    for s in sessions:
        print(
            f"\nlive session ({s['server']}): {s['frames']} frames of {args.frame_size}x{args.frame_size}, "
            f"{s['frames_per_push']} per push, {s['per_frame_p50_ms']:.1f} ms per frame (p99 "
            f"{s['per_frame_p99_ms']:.1f}), cache {s['cache_kib_first']:,.0f} -> {s['cache_kib_last']:,.0f} KiB, "
            f"a 16-token answer after them {s['ask_s']:.2f} s (the first {s['ask_first_s']:.2f} s)"
        )
