"""Peak memory of compressing a model loaded whole against one read a decoder layer at a time
(`model.load: by-layer`, svdcore.checkpoint), on a random-weight Llama of about 2 GB in float32.

    python -m bench.load_by_layer --json bench/results/cpu-load-by-layer.json
    python -m bench.load_by_layer --size tiny      # seconds: what the test runs

The model (hidden 2048, MLP 5504, 8 layers, vocabulary 32000, tied head: 470M parameters) is built
in-process once and saved as sharded safetensors under --dir, where later runs find it. Each of
four steps then runs in a process of its own, which reports its own peak RSS and wall time: the
statistics pass (what compute-covariances does) and the SVD-LLM compression from those statistics,
saved in bfloat16 (what truncate-and-update does), each with the model loaded whole and by layer.
The by-layer statistics and saved tensors are compared with the whole-model ones (they are equal,
not close). Calibration: --windows random windows of --seqlen tokens. Nothing here is asserted.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import parser as bench_parser, table, write_json

SIZES = {  # --size: the measured one, and one for the test that runs this bench
    "2gb": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=128, tie_word_embeddings=True),
}
STEPS = ("stats-whole", "stats-by-layer", "compress-whole", "compress-by-layer")
CPU, F32 = torch.device("cpu"), torch.float32


def build(directory: Path, shape: dict) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (directory / "model.safetensors.index.json").is_file():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=F32)
    model.save_pretrained(directory, max_shard_size="500MB")


def step(name: str, directory: Path, work: Path, windows: int, seqlen: int, vocab: int) -> dict:
    """One step, in this process; returns its wall time and peak RSS."""
    import resource

    from svdcore.checkpoint import ByLayer, ShardWriter, load_by_layer
    from svdcore.compress import collect_grams, compress_model
    from svdcore.covariances import linear_shapes, save_layer
    from svdcore.lowrank import save_compressed
    from svdcore.model import load_model
    from svdcore.ranks import uniform_ranks

    start = time.perf_counter()
    kind, load = name.split("-", 1)
    ids = torch.randint(0, vocab, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    if load == "whole":
        model, by_layer = load_model(str(directory), F32), None
    else:
        model, checkpoint = load_by_layer(str(directory), F32)
    out = work / name
    out.mkdir(parents=True)
    if kind == "stats":
        by_layer = None if load == "whole" else ByLayer(model, checkpoint, CPU, F32)
        collect_grams(model, ids, 4, CPU, lambda i, st: save_layer(out, i, st), by_layer=by_layer)
    else:
        ranks = uniform_ranks(linear_shapes(model), 0.2)
        shards = None
        if load != "whole":
            shards = ShardWriter(out, torch.bfloat16)
            by_layer = ByLayer(model, checkpoint, CPU, F32, shards.write_layer)
        compress_model(model, ranks, "svd-llm", work / "stats-whole", CPU, by_layer=by_layer)
        save_compressed(model, None, out, dtype=torch.bfloat16, shards=shards)
    # milliseconds: on the tests' tiny model a step can take under 0.05 s, which tenths rounded to 0
    return {"step": name, "wall_s": round(time.perf_counter() - start, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def tensors(directory: Path):
    """name -> (file, name) of every tensor saved under `directory` (one file or shards)."""
    from safetensors import safe_open

    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            found.update({name: file for name in f.keys()})
    return found


def same_tensors(a: Path, b: Path) -> bool:
    """Whether the two folders hold the same tensors under the same names (read one at a time)."""
    from safetensors import safe_open

    left, right = tensors(a), tensors(b)
    if left.keys() != right.keys():
        return False
    for name in left:
        with safe_open(str(left[name]), framework="pt") as f, safe_open(str(right[name]), framework="pt") as g:
            if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                return False
    return True


def main(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--size", choices=SIZES, default="2gb")
    p.add_argument("--dir", default=None,
                   help="where the random-weight model is saved, built when missing (default ~/.cache/svdcore-bench/llama-SIZE)")
    p.add_argument("--work", default=None, help="scratch folder for the statistics and models (default: a temporary one)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = SIZES[args.size]
    directory = Path(args.dir or Path.home() / f".cache/svdcore-bench/llama-{args.size}")
    if args.step:  # a child: one step, its figures on stdout
        print(json.dumps(step(args.step, directory, Path(args.work), args.windows, args.seqlen, shape["vocab_size"])))
        return
    import shutil
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    build(directory, shape)
    work = Path(args.work or tempfile.mkdtemp(prefix="svdcore-load-by-layer-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rows = []
    try:
        for name in STEPS:
            done = subprocess.run([sys.executable, "-m", "bench.load_by_layer", "--step", name, "--size", args.size,
                                   "--dir", str(directory),
                                   "--work", str(work), "--windows", str(args.windows), "--seqlen", str(args.seqlen)],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(table(rows[-1:], ["step", "wall_s", "peak_rss_gib"]).splitlines()[-1], flush=True)
        equal = {"stats": same_tensors(work / "stats-whole", work / "stats-by-layer"),
                 "compressed": same_tensors(work / "compress-whole", work / "compress-by-layer")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    params = sum(t.numel() for t in _parameters(shape))
    print(table(rows, ["step", "wall_s", "peak_rss_gib"]))
    print(f"model: {params / 1e6:.0f}M parameters, {params * 4 / 2**30:.2f} GiB in float32; "
          f"by-layer equal to whole: {equal}")
    write_json(args.json, "bench.load_by_layer", argv, {
        "device": "cpu", "shape": shape, "params": params, "float32_gib": round(params * 4 / 2**30, 2),
        "windows": args.windows, "seqlen": args.seqlen, "rows": rows, "equal": equal})


def _parameters(shape: dict):
    """The parameter tensors of `shape`, as meta tensors (no memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(LlamaConfig(**shape)).parameters())


if __name__ == "__main__":
    main()
