"""Choose ResSVD's defaults by measurement: residual split, per-stage metric and last-k layers.

    python -m bench.ressvd --ratios 0.2 0.4 --windows 16

Runs on the main pipeline's statistics (artifacts/stats, artifacts/linears.json: `dvc repro`
first) and scores every variant on held-out validation text (WikiText-2 valid and PTB valid,
--windows windows of 512 tokens each), never on the test splits the sweep reports. The
calibration windows are drawn from WikiText-2 valid too, so that column is slightly optimistic
for every variant alike. Prints a table and writes --json; nothing here is asserted.
"""
import copy
import time

import torch

from bench.common import parser as bench_parser, peak_memory, table, write_json
from svdcore.atomic import read_json
from svdcore.compress import compress_model
from svdcore.evaluation import evaluate_model
from svdcore.methods import Recipe
from svdcore.model import load_model, load_tokenizer, resolve_device
from svdcore.ranks import allocate

# (label, Recipe knobs): SVD-LLM alone, the residual split both ways, then partial-layer allocation
VARIANTS = [
    ("whitening", {}),
    ("plain 0.25 + whitening", {"residual_fraction": 0.25, "residual_metric": "plain"}),
    ("plain 0.5 + whitening", {"residual_fraction": 0.5, "residual_metric": "plain"}),
    ("whitening 0.75 + plain", {"residual_fraction": 0.75, "residual_metric": "whitening", "metric": "plain"}),
    ("whitening, last 1/2", {"allocation": "last-k", "last_layers": (1, 2)}),
    ("whitening, last 3/4", {"allocation": "last-k", "last_layers": (3, 4)}),
]


def main():
    p = bench_parser(__doc__, "device")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = resolve_device(args.device)
    dense = load_model(args.model, torch.float32)
    tokenizer = load_tokenizer(args.model)
    shapes = read_json("artifacts/linears.json", "linear shapes")["shapes"]
    layers = dense.config.num_hidden_layers
    score = lambda model, label: evaluate_model(model, tokenizer, ["wikitext2-valid", "ptb-valid"], 512,
                                                args.windows, 4, device, label)[0]["ppl"]
    rows = [{"ratio": 0.0, "variant": "dense", **score(dense, "dense")}]
    for ratio in args.ratios:
        for label, knobs in VARIANTS:
            knobs = dict(knobs)
            if "last_layers" in knobs:  # a share of the layers, rounded up
                share, of = knobs["last_layers"]
                knobs["last_layers"] = -(-share * layers // of)
            recipe = Recipe(**{"metric": "whitening", **knobs})
            ranks, decided = allocate(shapes, ratio, recipe.allocation, last_layers=recipe.last_layers)
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            compress_model(model, ranks, recipe, "artifacts/stats", device)
            seconds = time.perf_counter() - start
            rows.append({"ratio": ratio, "variant": label, **decided, **score(model, f"{label} @{ratio}"),
                         "compress_s": round(seconds, 1)})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    columns = ["ratio", "variant", "last_layers", "wikitext2-valid", "ptb-valid", "compress_s"]
    print(table(rows, columns))
    write_json(args.json, "bench.ressvd", None, {"windows": args.windows, "rows": rows, **peak_memory(device)})


if __name__ == "__main__":
    main()
