"""`infinitevl convert`: argument definitions and the runner (registered as a subcommand by `infinitevl_hf.cli`).

```python
>>> parser = argparse.ArgumentParser(prog="infinitevl convert")  # doctest: +SKIP
>>> add_convert_arguments(parser)
>>> run_convert(parser.parse_args(["--teacher", "Qwen/Qwen2.5-VL-3B-Instruct", "--out", "InfiniteVL-3B-init"]))
```
"""

from __future__ import annotations

import argparse
import sys

from .convert import DTYPES, ConversionError, convert_teacher
from .gdn_init import INIT_STRATEGIES


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--teacher", required=True, help="Qwen2.5-VL checkpoint folder or Hugging Face Hub id.")
    parser.add_argument("--out", required=True, help="Output folder (must not exist unless --force).")
    parser.add_argument(
        "--attention-layers",
        default="every:4",
        help="Layers kept as sliding-window attention: 'every:N' (i %% N == 0), 'all', or a list like '0,4,8'. "
        "Default: every:4.",
    )
    parser.add_argument("--window", type=int, default=8192, help="Sliding window of the attention layers, in tokens.")
    parser.add_argument("--init", choices=INIT_STRATEGIES, default="attention-transfer", help="Gated DeltaNet start.")
    parser.add_argument("--dtype", choices=[*sorted(DTYPES), "auto"], default="bfloat16", help="Output dtype.")
    parser.add_argument("--max-shard-size", default="2GB", help="Largest output shard (e.g. 2GB, 500MB).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random parts of the Gated DeltaNet init.")
    parser.add_argument("--force", action="store_true", help="Replace an existing --out (only after success).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run the conversion described by `args`; prints the output folder. Returns the exit status."""
    try:
        out = convert_teacher(
            args.teacher,
            args.out,
            attention_layers=args.attention_layers,
            window=args.window,
            init=args.init,
            dtype=args.dtype,
            force=args.force,
            max_shard_size=args.max_shard_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except ConversionError as error:
        print(f"infinitevl convert: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0


__all__ = ["add_convert_arguments", "run_convert"]
