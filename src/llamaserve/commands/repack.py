"""`llamaserve repack IN_DIR OUT_DIR [CHUNK_SIZE]`: Meta shards -> layers_{a}-{b} chunks."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "repack",
        help="merge Meta's consolidated.NN.pth shards into files of N layers each",
        description="Merge Meta's tensor-parallel shards into layers_{a}-{b}.pth files of CHUNK_SIZE layers. "
        "Memory use is bounded by the largest output chunk.",
    )
    p.add_argument("in_dir", help="directory with consolidated.NN.pth, params.json, tokenizer.model")
    p.add_argument("out_dir", help="output directory (must be empty or absent unless --force)")
    p.add_argument("chunk_size_pos", nargs="?", type=int, metavar="CHUNK_SIZE", help="layers per file (default 5)")
    p.add_argument("--chunk-size", type=int, default=None, help="layers per file (default 5)")
    p.add_argument("--format", choices=("pth", "safetensors"), default="pth", help="output file format")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from llamaserve.weights.repack import DEFAULT_CHUNK_SIZE, RepackError, repack

    if ns.chunk_size is not None and ns.chunk_size_pos is not None and ns.chunk_size != ns.chunk_size_pos:
        print(f"error: CHUNK_SIZE {ns.chunk_size_pos} and --chunk-size {ns.chunk_size} disagree", file=sys.stderr)
        return 2
    chunk = ns.chunk_size if ns.chunk_size is not None else ns.chunk_size_pos
    try:
        written = repack(
            ns.in_dir,
            ns.out_dir,
            DEFAULT_CHUNK_SIZE if chunk is None else chunk,
            fmt=ns.format,
            force=ns.force,
            progress=not ns.no_progress,
        )
    except RepackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} chunk(s) to {ns.out_dir}")
    return 0
