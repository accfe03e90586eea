"""The kernels a compression is made of, one at a time, and whether two of them overlap.

    python -m bench.kernels --device cuda --size 4096 --json kernels.json

Times the eigh of a size x size Gram-like matrix (float64 and float32), the Gram of one
calibration batch (8192 rows: bf16 inputs with float32 output where the device has the kernel,
plus the float64 total it is added to), and then runs a stream of bf16 GEMMs (a forward pass's
work) on the main thread while another thread runs eighs on its own CUDA stream, to see whether
the two overlap or take the sum of their times. Also the truncation loss that a float32 eigh gives
away against float64 (heavy-tailed activations, as LLMs have). Prints a table; asserts nothing.
"""
import threading
import time

import torch

from bench.common import device_name, parser as bench_parser, sync, table, write_json
from svdcore.gram import batch_gram
from svdcore.model import resolve_device


def timed(fn, device, reps: int = 3) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def gram_like(size: int, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, G): a random weight and the Gram of activations whose channel scales are log-normal
    (a few outlier channels, as in LLMs), float64."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(2 * size, size, device=device, dtype=torch.float64, generator=gen)
    x *= torch.exp(2 * torch.randn(size, device=device, dtype=torch.float64, generator=gen))
    w = 0.02 * torch.randn(size, size, device=device, dtype=torch.float64, generator=gen)
    return w, x.T @ x


def float32_eigh_loss(w: torch.Tensor, gram: torch.Tensor, sym: torch.Tensor, rank: int) -> float:
    """Relative excess of the whitened truncation loss when the eigh of sym = W G W^T runs in float32."""

    def loss(dtype):
        u = torch.linalg.eigh(sym.to(dtype))[1].flip(1)[:, :rank].double()
        d = w - u @ (u.T @ w)
        return float(((d @ gram) * d).sum())

    best = loss(torch.float64)
    return (loss(torch.float32) - best) / best


def overlap(device, sym: torch.Tensor, gemms: int, eighs: int) -> dict:
    """Seconds for `gemms` bf16 GEMMs, `eighs` float64 eighs, and both at once (GEMMs on the main
    stream, eighs in a thread on their own stream)."""
    x = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    w = torch.randn(4096, 11008, device=device, dtype=torch.bfloat16)

    def run_gemms():
        for _ in range(gemms):
            x @ w

    def run_eighs():
        for _ in range(eighs):
            torch.linalg.eigh(sym)

    alone = {"gemms_s": timed(run_gemms, device, 1), "eighs_s": timed(run_eighs, device, 1)}
    side = torch.cuda.Stream(device)

    def worker():
        with torch.cuda.stream(side):
            run_eighs()
        side.synchronize()

    torch.cuda.synchronize(device)
    start = time.perf_counter()
    thread = threading.Thread(target=worker)
    thread.start()
    run_gemms()
    torch.cuda.synchronize(device)
    thread.join()
    return {**alone, "together_s": time.perf_counter() - start}


def main(argv=None):
    parser = bench_parser(__doc__, "device")
    parser.add_argument("--size", type=int, default=4096, help="eigh and Gram width (7B: 4096; 11008 for down_proj)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    w, gram = gram_like(args.size, device)
    sym = w @ gram @ w.T
    sym = (sym + sym.T) / 2  # symmetric to the last bit, as eigh assumes
    rows = [{"kernel": f"eigh {args.size} {str(dtype).removeprefix('torch.')}",
             "ms": 1e3 * timed(lambda: torch.linalg.eigh(sym.to(dtype)), device)}
            for dtype in (torch.float64, torch.float32)]
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    for width in (args.size, int(args.size * 2.6875)):  # 4096 and 11008 for a 7B
        x = torch.randn(8192, width, device=device).to(half)
        total = torch.zeros(width, width, device=device, dtype=torch.float64)

        rows.append({"kernel": f"gram {width} ({str(half).removeprefix('torch.')} in, fp32 out)",
                     "ms": 1e3 * timed(lambda: batch_gram(x), device)})
        rows.append({"kernel": f"gram {width} + add into float64", "ms": 1e3 * timed(lambda: total.add_(batch_gram(x)), device)})
        del x, total
    result = {"device": device_name(device), "size": args.size,
              "kernels_ms": {r["kernel"]: round(r["ms"], 3) for r in rows},
              "float32_eigh_loss_excess": float32_eigh_loss(w, gram, sym, int(0.4 * args.size))}
    print(f"\n{result['device']}")
    print(table(rows, ["kernel", "ms"]))
    print(f"float32 eigh: truncation loss {result['float32_eigh_loss_excess']:.2e} above the float64 optimum "
          f"(rank {int(0.4 * args.size)} of {args.size})")
    if device.type == "cuda":
        result["overlap"] = {k: round(v, 3) for k, v in overlap(device, sym, 200, 8).items()}
        o = result["overlap"]
        print(f"200 bf16 GEMMs {o['gemms_s']:.3f} s, 8 float64 eighs {o['eighs_s']:.3f} s, "
              f"both at once on two streams {o['together_s']:.3f} s")
    write_json(args.json, __spec__.name if __spec__ else __name__, argv, result)
    return result


if __name__ == "__main__":
    main()
