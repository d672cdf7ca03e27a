"""`phalanx-data`: turn text files (or the built-in corpus) into token shards."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

try:
    from phalanx_trainer.corpus import builtin_documents
    from phalanx_trainer.data import DEFAULT_SHARD_TOKENS, PreparedData, prepare
except ModuleNotFoundError as error:  # one line, not a traceback
    raise SystemExit(
        f"phalanx-data needs the train extra ({error.name} is missing): "
        "pip install 'phalanx[train]'"
    ) from None

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


def read_documents(inputs: Sequence[str]) -> list[str]:
    """One document per file; directories contribute their text files in sorted order."""
    docs: list[str] = []
    for item in inputs:
        path = Path(item)
        files = (
            sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if path.is_dir()
            else [path]
        )
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                docs.append(text)
    return docs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phalanx-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text into shards and train a tokenizer")
    prep.add_argument("inputs", nargs="*", help="text files or directories (default: built-in)")
    prep.add_argument("--out", required=True, help="output data directory")
    prep.add_argument("--vocab-size", type=int, default=2048)
    prep.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    prep.add_argument("--val-every", type=int, default=100, help="every Nth document is val")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    info = sub.add_parser("info", help="describe a prepared data directory")
    info.add_argument("path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        docs = read_documents(args.inputs) if args.inputs else builtin_documents()
        if not docs:
            raise SystemExit("no text found in the given inputs")
        data = prepare(
            docs,
            args.out,
            vocab_size=args.vocab_size,
            val_every=args.val_every,
            shard_tokens=args.shard_tokens,
            tokenizer_path=args.tokenizer,
        )
    else:
        data = PreparedData.open(args.path)
    print(
        f"{data.path}: vocab {data.vocab_size}, {data.dtype.name}, "
        f"train {data.num_tokens('train')} tokens, val {data.num_tokens('val')} tokens"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
