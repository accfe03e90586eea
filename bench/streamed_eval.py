"""Perplexity on one device of a random-weight model of a real shape, the whole model moved to the
device against its decoder layers streamed through it one at a time (`evaluate.stream_layers`):
seconds, peak device memory (CUDA; the CPU has none of its own) and how far apart the two
perplexities are. The streamed pass runs first, so the whole model's copy on the device does not
count in its peak.

    python -m bench.streamed_eval --shape 7b --device cuda --samples 32 --seqlen 2048 \\
        --json bench/results/h100-streamed-eval-7b.json

The windows are random tokens: the cost of a pass does not depend on them, and both passes see the
same ones. Nothing here is asserted.
"""
import time

import torch

from bench.common import device_name, parser, peak_memory, sync, table, write_json
from bench.shapes import SHAPES, random_llama, random_windows
from svdcore.model import resolve_device, resolve_dtype
from svdcore.perplexity import perplexity


def main(argv=None):
    p = parser(__doc__, "shape", "device", "dtype")
    p.add_argument("--samples", type=int, default=8, help="windows scored")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = random_llama(args.shape, dtype, "cpu")  # where the streamed pass keeps it
    windows = random_windows(SHAPES[args.shape]["vocab_size"], args.samples, args.seqlen)
    rows = []
    for mode in ("streamed", "whole"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        result = perplexity(model, windows, args.batch_size, device, desc=mode, stream_layers=mode == "streamed")
        sync(device)
        rows.append({"mode": mode, "seconds": round(time.perf_counter() - start, 2),
                     "tokens_per_s": round(result["tokens_per_s"], 1), "ppl": result["ppl"], **peak_memory(device)})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    streamed, whole = rows
    result = {"model": f"{args.shape} (random weights)", "device": device_name(device),
              "dtype": str(dtype).removeprefix("torch."), "windows": f"{args.samples} x {args.seqlen}",
              "batch_size": args.batch_size, "rows": rows,
              "ppl_relative_difference": abs(streamed["ppl"] - whole["ppl"]) / whole["ppl"]}
    print(table(rows, list(rows[0])))
    print(f"perplexity, streamed against whole: {result['ppl_relative_difference']:.2e} relative")
    write_json(args.json, "bench.streamed_eval", argv, result)
    return result


if __name__ == "__main__":
    main()
