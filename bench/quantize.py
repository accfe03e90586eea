"""Bytes on disk and perplexity of the model as stored: dense and compressed, in float32, bfloat16,
and with torchao's weight-only int8 (svdcore.quantize), so that SVD + int8 and int8 alone can be
compared at equal bytes.

    python -m bench.quantize --ratios 0.2 0.4 --json bench/results/cpu-quantize.json

Runs on the main pipeline's artifacts (`make repro` first): each ratio is compressed with the
default method (svd-llm, uniform ranks) from artifacts/stats, saved in each storage, loaded back
from disk as a user would (trust_remote_code, computing in float32) and scored on the test splits
with the evaluate params' protocol (100 windows of 512 tokens). int8 is quantized from the
bfloat16 copy, so its unquantized tensors (embeddings, head, norms) stay bfloat16. Prints a row per
model as it lands; nothing is asserted.
"""
import tempfile
from copy import deepcopy
from pathlib import Path

import torch

from bench.common import parser as bench_parser, peak_memory, previous_rows, table, write_json
from svdcore.atomic import read_json
from svdcore.compress import compress_model
from svdcore.evaluation import evaluate_model
from svdcore.lowrank import save_compressed
from svdcore.methods import recipe
from svdcore.model import load_model, load_tokenizer, resolve_device
from svdcore.quantize import save_quantized
from svdcore.ranks import allocate

STORAGES = ("float32", "bfloat16", "int8")


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def saved(model, tokenizer, directory: Path, storage: str, ratio: float) -> Path:
    """`model` stored in `storage` under `directory`; int8 from the bfloat16 copy (saved first)."""
    out = directory / f"{ratio}-{storage}"
    if storage == "int8":
        done, linears = save_quantized(saved(model, tokenizer, directory, "bfloat16", ratio), out, "int8")
        print(f"ratio {ratio}: torchao quantized {done} of {linears} linears", flush=True)
    elif not out.is_dir():
        copy = deepcopy(model).to(getattr(torch, storage))  # the float32 original stays as it is
        if ratio:
            save_compressed(copy, tokenizer, out)
        else:
            copy.save_pretrained(out)
            tokenizer.save_pretrained(out)
    return out


def main(argv=None):
    p = bench_parser(__doc__, "device")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.2, 0.4], help="0 = the dense model")
    p.add_argument("--storages", nargs="+", default=list(STORAGES), choices=STORAGES)
    p.add_argument("--windows", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from stages.io import load_calibration

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    shapes = read_json("artifacts/linears.json", "linear shapes")["shapes"]
    rows = previous_rows(args.json)
    done = {(r["ratio"], r["storage"]) for r in rows}
    with tempfile.TemporaryDirectory() as scratch:
        for ratio in args.ratios:
            todo = [s for s in args.storages if (ratio, s) not in done]
            if not todo:
                continue
            model = load_model(args.model, torch.float32)
            if ratio:
                ranks, _ = allocate(shapes, ratio, "uniform", None, None, 1, None)
                compress_model(model, ranks, recipe("svd-llm"), "artifacts/stats", device, load_calibration(), 4)
            for storage in todo:
                directory = saved(model, tokenizer, Path(scratch), storage, ratio)
                loaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
                metrics, _ = evaluate_model(loaded.eval(), tokenizer, ["wikitext2", "ptb"], 512, args.windows, 4,
                                            device, f"{ratio} {storage}")
                rows.append({"ratio": ratio, "storage": storage, "weights_bytes": weights_bytes(directory),
                             **{f"ppl_{k}": v for k, v in metrics["ppl"].items()}})
                dense32 = next((r["weights_bytes"] for r in rows if r["ratio"] == 0 and r["storage"] == "float32"), None)
                for row in rows:
                    row["of_dense_float32"] = round(row["weights_bytes"] / dense32, 3) if dense32 else None
                print(table(rows[-1:], list(rows[-1])), flush=True)
                write_json(args.json, "bench.quantize", argv, {"windows": args.windows, "rows": rows, **peak_memory(device)})
    print(table(rows, list(rows[-1])))
    return rows


if __name__ == "__main__":
    main()
