"""Zero-shot accuracy of methods side by side, on more items than the pipeline's default limit.

    python -m bench.zeroshot --methods dense svd-llm ressvd best --ratio 0.2 --limit 200

Each method is compressed in memory as its sweep point is (`stages.compression.compress_point`: the main
pipeline's statistics, the preset's knobs, params.yaml's route and rank multiple, computing in model.dtype;
the sweep scores its saved model instead, stored in compress.save_dtype; `dvc repro`
and, for the fisher or sensitivity allocation, the sweep's fisher / sensitivity stages first),
then scored by lm-eval on the first --limit items of every task of params.yaml's `zeroshot`. With
--saved, each method's model is instead the one its sweep compress stage saved
(sweep/models/<method>@<ratio>/, as the sweep's zero-shot stage loads it): nothing is compressed again.
Prints per-task acc / acc_norm and the mean over tasks with its standard error (the tasks'
standard errors combined, as independent), and each method's margin over chance; writes --json
after every method. Nothing here is asserted.
"""
import time

from bench.common import parser as bench_parser, peak_memory, previous_rows, table, write_json
from svdcore.model import load_model, load_tokenizer, resolve_device, resolve_dtype
from svdcore.params import load
from svdcore.zeroshot import evaluate_zeroshot


def mean_stderr(tasks: dict, metric: str) -> float:
    """Standard error of the mean over tasks of `metric` (WinoGrande's acc for its acc_norm)."""
    errors = [s.get(f"{metric}_stderr", s.get("acc_stderr", 0.0)) for s in tasks.values()]
    return sum(e * e for e in errors) ** 0.5 / len(errors)


def main(argv=None):
    p = bench_parser(__doc__, "device")
    p.add_argument("--methods", nargs="+", default=["dense", "svd-llm", "ressvd", "best"],
                   help="dense, or sweep methods (a preset, optionally +update)")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--json", default=None)
    p.add_argument("--saved", action="store_true",
                   help="score the sweep's saved models (run its compress stages first) instead of compressing")
    args = p.parse_args(argv)
    from stages.compression import compress_point
    from stages.io import load_sweep_model

    params = load()
    device = resolve_device(params.device if args.device == "auto" else args.device)
    params = params.model_copy(update={"device": str(device)})  # what compress_point and load_sweep_model compute on, in its dtype
    tokenizer = load_tokenizer(params.model.name)
    zs = params.zeroshot
    previous = previous_rows(args.json)
    rows = [r for r in previous if r["limit"] == args.limit and r["ratio"] in (0.0, args.ratio)]
    # a compressed method is done when scored the same way (saved model or in memory); dense either way
    done = {r["method"] for r in rows if r["method"] == "dense" or r.get("saved", False) == args.saved}
    for method in args.methods:
        if method in done:
            continue
        start = time.perf_counter()
        if method == "dense":
            model, ratio = load_model(params.model.name, resolve_dtype(params.model.dtype, device)), 0.0
        elif args.saved:
            model, _, _, _ = load_sweep_model(params, method, args.ratio)
            ratio = args.ratio
        else:
            model, _ = compress_point(params, method, args.ratio)
            ratio = args.ratio
        compress_s = time.perf_counter() - start
        scores, runtime = evaluate_zeroshot(model, tokenizer, zs.tasks, args.limit, zs.batch_size, device)
        mean = scores["mean"]
        rows.append({"method": method, "ratio": ratio, "limit": args.limit,
                     "acc": mean["acc"], "acc_stderr": mean_stderr(scores["tasks"], "acc"),
                     "acc_norm": mean["acc_norm"], "acc_norm_stderr": mean_stderr(scores["tasks"], "acc_norm"),
                     "margin_acc_norm": mean["acc_norm"] - mean["chance"], "chance": mean["chance"],
                     "tasks": scores["tasks"], "saved": args.saved and method != "dense",
                     ("load_s" if args.saved else "compress_s"): round(compress_s, 1),
                     "zeroshot_s": round(sum(runtime["zeroshot_seconds"].values()), 1)})
        print(table(rows[-1:], ["method", "ratio", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
                                "margin_acc_norm", "zeroshot_s"]), flush=True)
        write_json(args.json, "bench.zeroshot", argv, {"rows": rows, **peak_memory(device)})
    tasks = list(rows[0]["tasks"]) if rows else []
    per_task = [{"method": r["method"], **{t: f"{r['tasks'][t]['acc']:.3f} / {r['tasks'][t].get('acc_norm', r['tasks'][t]['acc']):.3f}"
                                           for t in tasks}} for r in rows]
    print(table(rows, ["method", "saved", "ratio", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "margin_acc_norm"]))
    print(table(per_task, ["method", *tasks]))
    return rows


if __name__ == "__main__":
    main()
