"""Is the compressed model really faster? Prefill and decode tokens/s and weight memory, dense
against compressed at each ratio and rank multiple, on random-weight models of real shapes.

    python -m bench.infer --shape 7b --device cuda
    python -m bench.infer --shape smollm2 --device cpu --prefill-batch 4 --prefill-len 512

Prefill: one forward over batch x length tokens (logits of the last position only). Decode:
batch 1 and 16 from a prompt, a static KV cache, one token per step; on a GPU each step is a
replayed CUDA graph (eager decode measures Python and kernel launches, not the model), with
eager as the fallback, named in the output. Weights' values do not change the speed, so the
low-rank factors are random too. Prints a table and writes --json; nothing here is asserted.
"""
import time

import torch

from bench.common import device_name, parser as bench_parser, peak_memory, sync, table, write_json
from bench.shapes import random_llama
from svdcore.covariances import linear_shapes
from svdcore.model import resolve_device, resolve_dtype, weight_bytes
from svdcore.modeling_svdcore import install_low_rank
from svdcore.ranks import round_to_multiple, uniform_ranks


def variant(shape, dtype, device, ratio, multiple):
    """The model of `shape` on `device`, its decoder linears low-rank at `ratio` (0: dense)."""
    model = random_llama(shape, dtype, device)
    if ratio:
        shapes = linear_shapes(model)
        ranks = round_to_multiple(shapes, uniform_ranks(shapes, ratio), multiple)
        install_low_rank(model, {n: r for n, r in ranks.items() if r is not None})
        gen = torch.Generator(device).manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith((".reduce.weight", ".expand.weight")):
                    p.normal_(0, 0.02, generator=gen)
    return model.eval()


@torch.no_grad()
def prefill_tokens_per_s(model, device, batch, length, repeats):
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    for _ in range(2):  # warm-up: kernels chosen, memory pooled
        model(ids, use_cache=False, logits_to_keep=1)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        model(ids, use_cache=False, logits_to_keep=1)
    sync(device)
    return batch * length * repeats / (time.perf_counter() - start)


@torch.no_grad()
def decode_tokens_per_s(model, device, batch, prompt, steps):
    """(tokens/s, how): greedy decode from a random prompt with a static KV cache."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    logits = model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device),
                   use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)
    position = torch.tensor([prompt], device=device)

    def step():  # writes the next token and position in place: a graph replays it unchanged
        out = model(token, past_key_values=cache, cache_position=position, use_cache=True).logits
        token.copy_(out[:, -1:].argmax(-1))
        position.add_(1)

    run, how = step, "eager"
    if device.type == "cuda":
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run, how = graph.replay, "cuda graph"
        except Exception as e:  # capture needs a sync-free forward; say so and measure eager
            how = f"eager (graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:80]})"
            torch.cuda.synchronize(device)
    position.fill_(prompt + 2)
    run()  # warm-up
    sync(device)
    count = min(steps, prompt + steps + 8 - int(position) - 1)
    start = time.perf_counter()
    for _ in range(count):
        run()
    sync(device)
    return batch * count / (time.perf_counter() - start), how


def main(argv=None):
    parser = bench_parser(__doc__, "shape", "device", "dtype")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--rank-multiples", default="1,64")
    parser.add_argument("--prefill-batch", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--decode-batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    plans = [(0.0, 1)] + [(float(r), int(k)) for r in args.ratios.split(",") for k in args.rank_multiples.split(",")]
    rows, hows = [], set()
    for ratio, multiple in plans:
        model = variant(args.shape, dtype, device, ratio, multiple)
        row = {"model": "dense" if not ratio else f"{ratio:g}, ranks x{multiple}",
               "weights_mib": round(weight_bytes(model) / 2**20, 1)}
        row["prefill_tok_s"] = prefill_tokens_per_s(model, device, args.prefill_batch, args.prefill_len, args.repeats)
        for batch in map(int, args.decode_batches.split(",")):
            row[f"decode_b{batch}_tok_s"], how = decode_tokens_per_s(model, device, batch, args.prompt, args.steps)
            hows.add(how)
        rows.append(row)
        print(row, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dense = rows[0]
    speed_keys = [k for k in dense if k.endswith("tok_s")]
    for row in rows:
        for key in speed_keys:
            row[key.replace("tok_s", "x")] = row[key] / dense[key]
    columns = ["model", "weights_mib"] + [c for k in speed_keys for c in (k, k.replace("tok_s", "x"))]
    print(f"\n{args.shape} (random weights), {device_name(device)}, {str(dtype).removeprefix('torch.')}; "
          f"prefill {args.prefill_batch} x {args.prefill_len}; decode {args.prompt}-token prompt, {args.steps} steps "
          f"({'; '.join(sorted(hows))})")
    print(table(rows, columns))
    result = {"shape": args.shape, "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "decode": sorted(hows), "rows": rows, **peak_memory(device)}
    write_json(args.json, __spec__.name if __spec__ else __name__, argv, result)
    return result


if __name__ == "__main__":
    main()
