"""What each allocation spends where, and what it costs in whitened truncation loss.

    python -m bench.allocation_loss --ratios 0.1 0.2 0.3 0.4

From the main pipeline's whitened spectra (artifacts/spectra.safetensors, `dvc repro` first): per
allocation and ratio, the summed squared truncation loss of every linear (the sum of its dropped
squared whitened singular values: the calibration output error of each linear on the dense
model's inputs), split between the first and the second half of the layers, and the share of
parameters removed in each half. Seconds on a CPU; prints a table and writes --json.
"""
from bench.common import parser as bench_parser, table, write_json
from svdcore.atomic import read_json
from svdcore.ranks import allocate, layer_index, parameter_count, truncation_loss
from svdcore.spectra import load_spectra

ALLOCATIONS = ("uniform", "v2", "last-k")


def half_figures(shapes, ranks, spectra, layers) -> dict:
    row = {}
    for half, keep in (("first", lambda i: i < layers // 2), ("second", lambda i: i >= layers // 2)):
        names = [n for n in shapes if keep(layer_index(n))]
        part = {n: shapes[n] for n in names}
        dense = parameter_count(part, {n: None for n in names})
        row[f"removed_{half}"] = 1 - parameter_count(part, {n: ranks[n] for n in names}) / dense
        row[f"loss_{half}"] = sum(truncation_loss(spectra[n], ranks[n]) ** 2 for n in names if ranks[n] is not None)
    row["loss_total"] = row["loss_first"] + row["loss_second"]
    return row


def main():
    p = bench_parser(__doc__)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    shapes = read_json("artifacts/linears.json", "linear shapes")["shapes"]
    spectra = load_spectra("artifacts/spectra.safetensors")
    layers = 1 + max(layer_index(n) for n in shapes)
    rows = []
    for ratio in args.ratios:
        for allocation in ALLOCATIONS:
            ranks, decided = allocate(shapes, ratio, allocation, spectra)
            rows.append({"ratio": ratio, "allocation": allocation, **decided,
                         **half_figures(shapes, ranks, spectra, layers)})
    print(table(rows, ["ratio", "allocation", "last_layers", "removed_first", "removed_second",
                       "loss_first", "loss_second", "loss_total"]))
    write_json(args.json, "bench.allocation_loss", None, {"layers": layers, "rows": rows})


if __name__ == "__main__":
    main()
