"""Serving under load: requests/s and time to first token at 1, 8 and 32 concurrent clients, and the per-frame
latency of a live video session, for InfiniteVL and (``--baseline``) transformers' Qwen2.5-VL served the same way.

Each server is started as ``python -m ivl.serve`` (``--max-batch-size`` = the largest client count). Every
client sends ``--requests`` streamed chat requests one after another, each with one ``--image-size`` image and
the same question, greedy, ``--max-tokens`` new tokens; a client counts a request from sending it to the last
chunk, and its time to first token to the first chunk with text. The session pushes ``--frames`` frames two at a
time (one temporal patch per push) and asks one question at the end.
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
import time
from pathlib import Path

import requests
from PIL import Image

from ivl.serve.launch import running_server

QUESTION = "Describe the picture in one sentence."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="the InfiniteVL folder (default: as lightning_app.py)")
    parser.add_argument("--baseline", default=None, help="a Qwen2.5-VL folder served the same way, for reference")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--frames", type=int, default=200, help="frames pushed into the live session")
    parser.add_argument("--frame-size", type=int, default=448)
    parser.add_argument("--frames-per-push", type=int, nargs="+", default=[2],
                        help="frames per push call (one temporal patch is 2): a row per value")
    parser.add_argument("--random", type=Path, default=None, metavar="DIR",
                        help="serve random weights at the 4B shapes (tiny with --device cpu), written to DIR once: "
                             "InfiniteVL converted from a Qwen2.5-VL-3B-shaped teacher, and that teacher as baseline")
    parser.add_argument("--in-process", action="store_true",
                        help="no server: time Engine.generate per decoder and batch size (first token, ms per step)")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per measurement")


def _png(size: int, seed: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, 120)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _one_request(url: str, image: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text chunk, seconds to the end, tokens generated) of one streamed request."""
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": QUESTION}]}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start, first, tokens = time.perf_counter(), None, 0
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    return (first if first is not None else end), end, tokens


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def load(url: str, clients: int, per_client: int, max_tokens: int, image_size: int) -> dict:
    image = _png(image_size, clients)

    def client(requests: int):
        return [_one_request(url, image, max_tokens) for _ in range(requests)]

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [1] * clients))  # warm-up round: compilation and CUDA graphs of these batch sizes
        start = time.perf_counter()
        results = [r for rs in pool.map(client, [per_client] * clients) for r in rs]
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    # random weights may stop early on an end token: the tokens generated keep the servers comparable
    return {"clients": clients, "requests": len(results), "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r[2] for r in results) / wall,
            "tokens_per_request": statistics.mean(r[2] for r in results),
            "ttft_p50_s": statistics.median(ttft), "ttft_p90_s": _p90(ttft),
            "latency_p50_s": statistics.median(r[1] for r in results)}


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
    times.sort()
    return {"frames": per_push * len(times), "frames_per_push": per_push,
            "per_frame_p50_ms": 1e3 * statistics.median(times), "per_frame_p90_ms": 1e3 * _p90(times),
            "ask_first_s": asks[0], "ask_s": asks[1],
            "cache_kib_first": sizes[0] / 2**10, "cache_kib_last": sizes[-1] / 2**10}


def random_models(folder: Path, device: str) -> tuple[Path, Path]:
    """(InfiniteVL folder, Qwen2.5-VL folder) of random bf16 weights at the 4B shapes (tiny on the CPU), with the
    bundled tokenizer; written once."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ivl.data.processing import Processor
    from ivl.model import convert_qwen2_5_vl
    from ivl.model.teachers import QWEN2_5_VL_3B, TINY_TEACHER

    student, teacher_dir = folder / "infinitevl", folder / "qwen2.5-vl"
    if (student / "config.json").exists() and (teacher_dir / "config.json").exists():
        return student, teacher_dir
    config = Qwen2_5_VLConfig(**(TINY_TEACHER if device == "cpu" else QWEN2_5_VL_3B))
    torch.manual_seed(0)
    with torch.device(device):
        teacher = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa").eval()
    converted, _ = convert_qwen2_5_vl(teacher, dtype=torch.bfloat16, device=device)
    processor = Processor.from_pretrained()
    for model, out in ((teacher, teacher_dir), (converted, student)):
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return student, teacher_dir


def in_process(args: argparse.Namespace) -> list[dict]:
    """Engine.generate without the server: seconds to the first token and ms per decode step, per decoder (the
    kept fixed-shape decoders, captured on CUDA; the dynamic cache) and batch size."""
    import torch

    from ivl.serve.engine import Engine, Prompt, Sampling
    from ivl.serve.loading import load as load_model

    model, processor, _ = load_model(args.model, args.device, args.dtype if args.device != "cpu" else None)
    image = Image.open(io.BytesIO(base64.b64decode(_png(args.image_size, 0).split(",", 1)[1]))).convert("RGB")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def generate(engine, batch, tokens):
        prompts = [Prompt(text, images=[image], sampling=Sampling(max_tokens=tokens)) for _ in range(batch)]
        sync()
        start, first, steps = time.perf_counter(), None, 0
        for _ in engine.generate(prompts):
            first = first if first is not None else time.perf_counter() - start
            steps += 1
        sync()
        return first, (time.perf_counter() - start - first) / max(steps - 1, 1)

    rows = []
    for decoder in ("cuda_graph" if args.device == "cuda" else "static", "dynamic"):
        engine = Engine(model, processor, decoder=decoder)
        for batch in args.clients:
            generate(engine, batch, 4)  # compilation, capture of this batch size
            first, step = generate(engine, batch, args.max_tokens)
            rows.append({"decoder": decoder, "batch": batch, "first_token_s": first, "ms_per_step": 1e3 * step})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| decoder | batch | first token s | ms per decode step |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['decoder']} | {r['batch']} | {r['first_token_s']:.3f} | {r['ms_per_step']:.2f} |")
    return rows


def run(args: argparse.Namespace) -> None:
    if args.random is not None:
        student, teacher = random_models(args.random, args.device)
        args.model, args.baseline = str(student), args.baseline or str(teacher)
    if args.in_process:
        rows = in_process(args)
        if args.out:
            with args.out.open("a") as f:
                for r in rows:
                    f.write(json.dumps({**r, "device": args.device, "date": str(datetime.date.today())}) + "\n")
        return
    rows, sessions = [], []
    servers = [("InfiniteVL", ["--model", args.model] if args.model else [])]
    if args.baseline:
        servers.append(("Qwen2.5-VL (transformers)", ["--baseline", args.baseline]))
    common = ["--device", args.device, "--max-batch-size", str(max(args.clients)), "--max-tokens",
              str(max(args.max_tokens, 16))] + (["--dtype", args.dtype] if args.device != "cpu" else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in servers:
            with running_server(*extra, *common, log_path=Path(tmp) / "server.log", timeout=600) as (url, _):
                for clients in args.clients:
                    row = {"server": name, **load(url, clients, args.requests, args.max_tokens, args.image_size)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                for per_push in args.frames_per_push if name == "InfiniteVL" and args.frames else []:
                    sessions.append({"server": name, **session(url, args.frames, args.frame_size, per_push)})
                    print(json.dumps(sessions[-1]), flush=True)
    if args.out:
        with args.out.open("a") as f:
            for r in rows + sessions:
                f.write(json.dumps({**r, "device": args.device, "date": str(datetime.date.today())}) + "\n")
    print(f"\n# {args.device} | {datetime.date.today()} | {args.max_tokens} new tokens, one "
          f"{args.image_size}x{args.image_size} image per request, {args.requests} requests per client\n")
    print("| server | clients | requests/s | tokens/s | tokens/request | TTFT p50 s | TTFT p90 s | latency p50 s |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_request']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p90_s']:.3f} | "
              f"{r['latency_p50_s']:.3f} |")
    for s in sessions:
        print(f"\nlive session ({s['server']}): {s['frames']} frames of {args.frame_size}x{args.frame_size}, "
              f"{s['frames_per_push']} per push, {s['per_frame_p50_ms']:.1f} ms per frame (p90 "
              f"{s['per_frame_p90_ms']:.1f}), cache {s['cache_kib_first']:,.0f} -> {s['cache_kib_last']:,.0f} KiB, "
              f"a 16-token answer after them {s['ask_s']:.2f} s (the first {s['ask_first_s']:.2f} s)")
