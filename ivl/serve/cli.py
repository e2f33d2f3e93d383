"""`python lightning_app.py` (or `python -m ivl.serve`): serve a trained InfiniteVL."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from ivl.cpu_threads import fit_threads_to_cpus
from ivl.serve.loading import DEMO_MODEL, model_name, resolve
from ivl.serve.messages import Limits


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python lightning_app.py", description=__doc__)
    parser.add_argument(
        "--model",
        default=None,
        help="a saved InfiniteVL folder (default: runs/demo/model when "
        "the demo was trained here, else a tiny random model with the real tokenizer)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the saved one"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="the engine's cache slots: requests decoded at once (more wait their turn)",
    )
    parser.add_argument(
        "--step-budget",
        type=int,
        default=4096,
        help="prompt tokens prefilled between two decode steps while other requests decode",
    )
    parser.add_argument("--max-tokens", type=int, default=1024, help="most new tokens a request may ask for")
    parser.add_argument("--max-context", type=int, default=32768, help="prompt + new tokens, per request")
    parser.add_argument(
        "--media-root",
        type=Path,
        default=None,
        help="allow file:// images and frames from under this folder (default: none)",
    )
    parser.add_argument("--max-sessions", type=int, default=8, help="live video sessions open at once")
    parser.add_argument("--session-idle-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument(
        "--baseline",
        default=None,
        help="serve a Qwen2.5-VL folder instead, converted exactly (every "
        "layer full attention) onto the same engine: the reference for serving benchmarks (no video "
        "sessions)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("IVL_API_KEY"),
        help="require Authorization: Bearer KEY on every endpoint but /health (default: $IVL_API_KEY)",
    )
    args = parser.parse_args(argv)
    folder = Path(args.baseline) if args.baseline else resolve(args.model)
    if folder is not None and not (folder / "config.json").is_file():
        parser.error(f"{'--baseline' if args.baseline else '--model'} {folder}: no config.json there")
    if args.media_root is not None and not args.media_root.is_dir():
        parser.error(f"--media-root {args.media_root}: no such folder")
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    fit_threads_to_cpus()
    import uvicorn  # the model and the web stack load after the arguments are good

    from ivl.serve.app import Settings, build_app
    from ivl.serve.engine import ChatEngine
    from ivl.serve.loading import load, load_baseline

    limits = Limits(
        max_tokens=args.max_tokens, max_context=args.max_context, media_root=args.media_root, max_n=args.max_batch_size
    )
    settings = Settings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        limits=limits,
        max_sessions=args.max_sessions,
        session_idle_timeout=args.session_idle_timeout,
        api_key=args.api_key,
        baseline=args.baseline,
        step_budget=args.step_budget,
    )
    if args.baseline:
        model, processor, name = load_baseline(args.baseline, args.device, args.dtype)
    else:
        model, processor, name = load(args.model, args.device, args.dtype)
    chat = ChatEngine(
        model, processor, capacity=args.max_batch_size, max_context=args.max_context, step_budget=args.step_budget
    )
    engine = threading.Thread(target=chat.engine.run, name="ivl-engine", daemon=True)
    engine.start()
    app = build_app(settings, chat, name)
    url = f"http://{args.host}:{args.port}"
    lines = [
        f"serving {served_model(args)} on {args.device}",
        f"  page: {url}/",
        f"  OpenAI API: {url}/v1 (chat/completions, models)",
    ]
    if not args.baseline:
        lines.append(f"  video sessions: {url}/v1/sessions")
    print("\n".join(lines), flush=True)
    # uvicorn shuts down gracefully on SIGTERM (a service manager's stop) and SIGINT, then raises the signal again
    # under the handler it found: exit 0 there, as for any finished serve.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    except KeyboardInterrupt:  # Ctrl+C, raised again after the graceful shutdown
        pass
    finally:
        chat.engine.stop()


def served_model(args: argparse.Namespace) -> str:
    """What the startup line says is served: the folder it was loaded from, in full."""
    if args.baseline:
        return (
            f"{Path(args.baseline).resolve()} (Qwen2.5-VL converted exactly, every layer full attention: the baseline)"
        )
    folder = resolve(args.model)
    if folder is None:
        return f"{model_name(None)} (no --model and no {DEMO_MODEL} here: a tiny random model, answers are noise)"
    return f"{folder.resolve()}" + (" (the demo's trained model; --model picks another)" if args.model is None else "")
