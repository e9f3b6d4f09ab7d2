"""`pangudraw convert`: rewrite a model directory's weights as float16 (half the bytes) or float32.

    pangudraw convert my-model --weights-dtype float16              # in place
    pangudraw convert my-model --weights-dtype float16 --out small  # into a new directory
"""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="store a model directory's weights as float16 (half the bytes) or float32")
    p.add_argument("model", help="model directory")
    p.add_argument("--weights-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of the stored weights (default: %(default)s; loading casts them back to the "
                        "network's dtype)")
    p.add_argument("--out", default=None, help="new directory to write (default: rewrite MODEL in place)")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from diffusion.model import convert_weights

    result = convert_weights(args.model, args.weights_dtype, args.out)
    print(f"{args.out or args.model}: weights stored as {result['weights_dtype']}, "
          f"{result['bytes_before'] / 2**20:.1f} MB -> {result['bytes_after'] / 2**20:.1f} MB "
          f"(model hash {result['hash']})")
    return 0
