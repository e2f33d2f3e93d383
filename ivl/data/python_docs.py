"""A real English text corpus that installs with Python itself: CPython's documentation topics and the
docstrings of the standard library, as chat records (train / held-out, split by topic) for text distillation.

- ``pydoc_data.topics``: the language reference's topics (about 465K characters), one topic each.
- Docstrings of the standard library's modules, classes and functions, read from the source files with ``ast``
  (no module is imported, so nothing runs), one topic per module.

Each topic is cut into chunks of at most ``--max-chars`` at paragraph boundaries; a record asks about the topic
and answers with one chunk. A topic lands wholly in train or wholly in held-out (by a hash of its name), so no
held-out text was seen in training.

    python -m ivl.data.python_docs --out data/python-docs [--tokenizer teachers/smollm2]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

from tqdm import tqdm

from ivl.errors import UsageError


def reference_topics() -> dict[str, str]:
    """{"reference/<topic>": text} of the language reference (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    return {f"reference/{name}": text.strip() for name, text in sorted(topics.items()) if text.strip()}


def docstring_topics(stdlib: Path | None = None) -> dict[str, str]:
    """{"stdlib/<module>": its module, class and function docstrings}, read from the standard library's sources."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out = {}
    files = sorted(p for p in stdlib.rglob("*.py") if not {"test", "tests", "idle_test", "site-packages"}
                   & set(p.relative_to(stdlib).parts[:-1]))
    for path in tqdm(files, desc="docstrings", unit="file", leave=False):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few lib2to3 fixtures and encodings tests are not valid Python 3
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40 and (node is tree or not isinstance(node, ast.Module)):
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    parts.append(f"{name}\n\n{doc.strip()}")
        if parts:
            out[f"stdlib/{module}"] = "\n\n".join(dict.fromkeys(parts))
    return out


def chunks(text: str, max_chars: int) -> list[str]:
    """``text`` cut at paragraph boundaries into pieces of at most ``max_chars`` (a longer paragraph at lines,
    a longer line anywhere); joined with blank lines they give back every paragraph."""
    def lines(paragraph: str) -> list[str]:
        if len(paragraph) <= max_chars:
            return [paragraph]
        cut = [line[i:i + max_chars] for line in paragraph.split("\n") for i in range(0, max(len(line), 1), max_chars)]
        return _pack(cut, "\n", max_chars)

    return _pack([part for paragraph in text.split("\n\n") for part in lines(paragraph)], "\n\n", max_chars)


def _pack(parts: list[str], sep: str, max_chars: int) -> list[str]:
    """Consecutive ``parts`` joined by ``sep`` into as few pieces of at most ``max_chars`` as a greedy pass makes."""
    out: list[str] = []
    for part in parts:
        if out and len(out[-1]) + len(sep) + len(part) <= max_chars:
            out[-1] += sep + part
        else:
            out.append(part)
    return out


def held_out(topic: str, fraction: float) -> bool:
    return int(hashlib.sha256(topic.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def record(topic: str, piece: str, index: int, total: int) -> dict:
    title = topic.split("/", 1)[1]
    kind = "the language reference" if topic.startswith("reference/") else "the standard library"
    where = f" (part {index + 1} of {total})" if total > 1 else ""
    return {"conversations": [{"from": "human", "value": f"Quote Python's documentation on `{title}` from {kind}"
                                                          f"{where}."},
                              {"from": "gpt", "value": piece}],
            "topic": topic}


def build(out: str | Path, max_chars: int = 2000, held_out_fraction: float = 0.1, tokenizer: str | None = None,
          docstrings: bool = True) -> dict:
    """Writes ``train.jsonl``, ``val.jsonl`` and ``stats.json`` (records, topics, characters and, with a
    tokenizer folder, tokens of the answers) under ``out``; returns the stats."""
    if not 0 < held_out_fraction < 1:
        raise UsageError(f"--held-out must be between 0 and 1; got {held_out_fraction}")
    topics = {**reference_topics(), **(docstring_topics() if docstrings else {})}
    splits = {"train": [], "val": []}
    for topic, text in topics.items():
        pieces = chunks(text, max_chars)
        split = "val" if held_out(topic, held_out_fraction) else "train"
        splits[split] += [record(topic, p, i, len(pieces)) for i, p in enumerate(pieces)]
    for split, records in splits.items():
        if not records:
            raise UsageError(f"the {split} split is empty ({len(topics)} topics, held-out fraction "
                             f"{held_out_fraction}): use a held-out fraction that leaves topics on both sides")
    count = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        count = AutoTokenizer.from_pretrained(tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, records in splits.items():
        with (out / f"{split}.jsonl").open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        answers = [r["conversations"][1]["value"] for r in records]
        stats[split] = {"records": len(records), "topics": len({r["topic"] for r in records}),
                        "characters": sum(map(len, answers))}
        if count is not None:
            stats[split]["tokens"] = sum(len(ids) for ids in count(answers)["input_ids"])
    if count is not None:
        stats["tokenizer"] = str(tokenizer)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ivl.data.python_docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-chars", type=int, default=2000, help="longest answer in characters")
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of topics held out")
    parser.add_argument("--tokenizer", help="a folder with tokenizer files, to count tokens (e.g. the teacher's)")
    parser.add_argument("--no-docstrings", action="store_true", help="the language reference only")
    args = parser.parse_args(argv)
    try:
        stats = build(args.out, args.max_chars, args.held_out, args.tokenizer, not args.no_docstrings)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for split in ("train", "val"):
        s = stats[split]
        tokens = f", {s['tokens']:,} tokens" if "tokens" in s else ""
        print(f"{split}: {s['records']:,} records from {s['topics']} topics, {s['characters']:,} characters{tokens}")


if __name__ == "__main__":
    main()
