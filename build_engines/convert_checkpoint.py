"""Convert a Hugging Face checkpoint into a TensorRT-LLM checkpoint, one shard per rank.

``python -m build_engines.convert_checkpoint --model_dir HF --output_dir CKPT --dtype bfloat16
--tp_size 2 --pp_size 1 [--use_weight_only --weight_only_precision int8]``

The flags are the subset of NVIDIA's ``examples/models/core/<family>/convert_checkpoint.py`` that
triage uses, and the work is the same (``from_hugging_face`` per rank with a ``Mapping``, then
``save_checkpoint``), but through the tensorrt-llm 1.2.x wheel alone, so no TensorRT-LLM source
checkout is needed. Needs a machine with tensorrt-llm installed (a GPU machine).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Sequence
from typing import Any

WEIGHT_ONLY_ALGOS = {"int8": "W8A16", "int4": "W4A16"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--output_dir", required=True, help="TensorRT-LLM checkpoint directory")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32", "auto"]
    )
    parser.add_argument("--tp_size", type=int, default=1)
    parser.add_argument("--pp_size", type=int, default=1)
    parser.add_argument("--use_weight_only", action="store_true")
    parser.add_argument(
        "--weight_only_precision", default="int8", choices=sorted(WEIGHT_ONLY_ALGOS)
    )
    args = parser.parse_args(argv)
    if args.tp_size < 1 or args.pp_size < 1:
        parser.error("--tp_size and --pp_size must be >= 1")
    return args


def quant_algo_name(args: argparse.Namespace) -> str | None:
    """The ``QuantAlgo`` member name for the flags (None: no quantisation)."""
    return WEIGHT_ONLY_ALGOS[args.weight_only_precision] if args.use_weight_only else None


def convert(args: argparse.Namespace) -> None:
    import tensorrt_llm
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models.automodel import AutoModelForCausalLM
    from tensorrt_llm.models.modeling_utils import QuantConfig
    from tensorrt_llm.quantization import QuantAlgo

    print(f"tensorrt_llm {tensorrt_llm.__version__}", flush=True)
    quant = QuantConfig()
    algo = quant_algo_name(args)
    if algo is not None:
        quant.quant_algo = getattr(QuantAlgo, algo)
    model_cls: Any = AutoModelForCausalLM.get_trtllm_model_class(args.model_dir)
    world = args.tp_size * args.pp_size
    started = time.monotonic()
    for rank in range(world):
        tick = time.monotonic()
        mapping = Mapping(world_size=world, rank=rank, tp_size=args.tp_size, pp_size=args.pp_size)
        model = model_cls.from_hugging_face(
            args.model_dir, args.dtype, mapping=mapping, quant_config=quant
        )
        model.save_checkpoint(args.output_dir, save_config=(rank == 0))
        del model
        gc.collect()
        print(f"rank {rank + 1}/{world} converted in {time.monotonic() - tick:.1f} s", flush=True)
    print(f"checkpoint written to {args.output_dir} in {time.monotonic() - started:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except ImportError as exc:
        print(f"convert_checkpoint: tensorrt-llm is not installed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
