"""Time a whole compression, phase by phase, and its peak memory (SVD-LLM whitening by default).

    python -m bench.compress --shape 7b --device cuda --samples 256 --seqlen 2048
    python -m bench.compress --model smollm2-135m --device cpu --samples 32 --seqlen 512
    python -m bench.compress --shape 7b --device cuda --method aa-svd --refine-steps 32

--shape builds a random-weight Llama of that shape in CPU memory (bench/shapes.py); --model
loads a real one (the default pipeline's SmolLM2 on a CPU). --method takes any preset but FWSVD's; an allocation
that needs a measurement (v2's spectra, the sensitivity costs) is priced as uniform ranks of the
same budget. The anchored closed form and the block refinement stream the windows through the
layer loop, so they time that loop too. The layers stream through the
device one at a time, as in the pipeline. --mode pipeline is what `dvc repro` does: Grams to a
statistics directory (float32 safetensors), then truncation from it; --mode fused gathers each
layer's Grams and truncates it while it is on the device, writing nothing.
Prints a table and writes --json; nothing here is asserted.
"""
import tempfile
import time

import torch

from bench.common import device_name, parser as bench_parser, peak_memory, table, write_json
from bench.shapes import random_llama, random_windows
from svdcore import streaming
from svdcore.compress import collect_grams, compress_model
from svdcore.covariances import linear_shapes, save_layer
from svdcore.decompose import ROUTES
from svdcore.methods import PRESETS, recipe
from svdcore.model import resolve_device, resolve_dtype
from svdcore.ranks import allocate, parameter_count
from svdcore.timing import Sections


def build(args, device):
    dtype = resolve_dtype(args.dtype, device)
    start = time.perf_counter()
    if args.model:
        from svdcore.model import load_model

        model = load_model(args.model, dtype)
        label = args.model
    else:
        model = random_llama(args.shape, dtype, "cpu", seed=0)
        label = f"{args.shape} (random weights)"
    return model, label, dtype, time.perf_counter() - start


def main(argv=None):
    parser = bench_parser(__doc__, "shape", "device", "dtype")
    parser.add_argument("--model", help="a real model instead of --shape (as model.name in params.yaml)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--rank-multiple", type=int, default=1)
    parser.add_argument("--route", default="auto", choices=ROUTES)
    parser.add_argument("--mode", default="pipeline", choices=("pipeline", "fused"))
    parser.add_argument("--method", default="svd-llm", choices=[m for m in PRESETS if not recipe(m).needs_fisher])
    parser.add_argument("--refine-steps", type=int, default=None, help="block refinement steps (default: the preset's)")
    parser.add_argument("--offload", action="store_true", help="calibration activations in pinned CPU memory")
    parser.add_argument("--serial", action="store_true", help="no overlap of moves and decompositions (GPU)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    streaming.OVERLAP = not args.serial
    model, label, dtype, build_s = build(args, device)
    windows = random_windows(model.config.vocab_size, args.samples, args.seqlen)
    shapes = linear_shapes(model)
    method = recipe(args.method, refine_steps=args.refine_steps)
    allocation = method.allocation if method.allocation == "last-k" else "uniform"  # the others need measurements
    ranks, _ = allocate(shapes, args.ratio, allocation, None, method.last_layers, args.rank_multiple)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    sections = Sections()
    with tempfile.TemporaryDirectory(prefix="svdcore-bench-") as stats_dir, sections.active():
        start = time.perf_counter()
        if args.mode == "pipeline":
            collect_grams(model, windows, args.batch_size, device, lambda i, s: save_layer(stats_dir, i, s),
                          offload=args.offload)
            statistics_s = time.perf_counter() - start
            report = compress_model(model, ranks, method, stats_dir, device, windows, args.batch_size,
                                    route=args.route, offload=args.offload)
        else:
            report = compress_model(model, ranks, method, None, device, windows, args.batch_size,
                                    route=args.route, offload=args.offload)
            statistics_s = None
        total_s = time.perf_counter() - start

    phases = dict(sorted(sections.seconds.items()))
    if device.type != "cuda":  # serial: the rest is Python and bookkeeping
        phases["other"] = total_s - sum(phases.values())
    dense = parameter_count(shapes, {n: None for n in shapes})
    result = {
        "model": label, "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
        "mode": args.mode, "method": args.method, "refine_steps": method.refine_steps, "route": args.route, "offload": args.offload, "overlap": streaming.OVERLAP and device.type == "cuda",
        "calibration": f"{args.samples} x {args.seqlen}", "batch_size": args.batch_size,
        "ratio": args.ratio, "rank_multiple": args.rank_multiple,
        "achieved_ratio": round(1 - parameter_count(shapes, ranks) / dense, 5),
        "layers": model.config.num_hidden_layers, "build_s": round(build_s, 2),
        "statistics_s": None if statistics_s is None else round(statistics_s, 2),
        "total_s": round(total_s, 2), "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "route_counts": report["route_counts"], **peak_memory(device),
    }
    print(f"\n{label}, {result['device']}, {result['dtype']}, {args.samples} x {args.seqlen} tokens, "
          f"ratio {args.ratio} (rank multiple {args.rank_multiple}), mode {args.mode}, route {args.route}")
    if result["overlap"]:
        print("(phases are busy times per thread: on a GPU moves, forward+grams and decompositions overlap)")
    print(table([{"phase": k, "seconds": v} for k, v in phases.items()] + [{"phase": "**total**", "seconds": total_s}],
                ["phase", "seconds"]))
    print(f"peak memory: {peak_memory(device)}")
    write_json(args.json, __spec__.name if __spec__ else __name__, argv, result)
    return result


if __name__ == "__main__":
    main()
