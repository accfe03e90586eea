"""evaluate: the compressed model against the cached dense baseline; metrics + one MLflow run."""
import time

from svdcore.atomic import read_json, write_json
from svdcore.errors import UserError
from svdcore.evaluation import directory_bytes, evaluate_model, linear_parameters
from svdcore.generation import check_same_prompts, generate_samples, side_by_side
from svdcore.lowrank import load_compressed
from svdcore.model import resolve_device, resolve_dtype
from svdcore.zeroshot import check_same_protocol, evaluate_zeroshot
from stages.common import STAGE_METRICS, STARTED, peak_memory, run
from stages.io import MODEL_DIR, REPORT
from stages.tracking import log_run, output_md5

OUT = "metrics/evaluate.json"
SAMPLES = "metrics/samples.json"
DENSE_SAMPLES = "metrics/dense-samples.json"


def work(params):
    from transformers import AutoTokenizer

    device = resolve_device(params["device"])  # first: a bad device fails before any slow work
    ev, zs, gen = params["evaluate"], params["zeroshot"], params["generate"]
    dense = read_json("metrics/dense.json", "dense baseline")
    check_same_protocol(dense.get("zeroshot", {}), zs["tasks"], zs["limit"])
    dense_samples = read_json(DENSE_SAMPLES, "dense generation samples")
    check_same_prompts(dense_samples, gen["prompts"], gen["max_new_tokens"])
    ranks = read_json("artifacts/ranks.json", "ranks")
    report = read_json(REPORT, "compression report")
    model = load_compressed(MODEL_DIR, dtype=resolve_dtype(params["model"]["dtype"], device))
    if linear_parameters(model) != ranks["linear_params_compressed"]:
        raise UserError(f"{MODEL_DIR} does not hold the ranks of artifacts/ranks.json; rerun truncate-and-update")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    compressed, runtime = evaluate_model(model, tokenizer, ev["datasets"], ev["seqlen"], ev["max_windows"],
                                         ev["batch_size"], device, "compressed")
    compressed["zeroshot"], zeroshot_runtime = evaluate_zeroshot(model, tokenizer, zs["tasks"], zs["limit"],
                                                                 zs["batch_size"], device)
    runtime.update(zeroshot_runtime)
    compressed["bytes_on_disk"] = directory_bytes(MODEL_DIR)
    metrics = {
        "dense": dense,
        "compressed": compressed,
        "ratio": {"target": params["compress"]["ratio"],
                  "linears": 1 - compressed["params_linears"] / dense["params_linears"],
                  "model": 1 - compressed["params_total"] / dense["params_total"]},
        "whitening_routes": {"matrices": report["route_counts"], "grams": report["gram_route_counts"]},
    }
    write_json(OUT, metrics)
    samples = generate_samples(model, tokenizer, gen["prompts"], gen["max_new_tokens"], device)
    write_json(SAMPLES, {"max_new_tokens": gen["max_new_tokens"],
                         "samples": side_by_side(dense_samples["samples"], samples)})

    # the latest wall time and memory of every stage in this workspace (the optional quantize stage's
    # too, when it ran): read, never depended on, so that wall times do not enter this stage's run-cache key
    stages = {path.stem: read_json(path, f"{path.stem} timings") for path in sorted(STAGE_METRICS.glob("*.json"))
              if path.stem != "evaluate"}
    stages["evaluate"] = {**runtime, "wall_s": time.perf_counter() - STARTED, **peak_memory()}
    # the model version and the run find each other: the run is tagged with the model's DVC hash
    log_run(params["mlflow"]["experiment"], params, {**metrics, "stages": stages},
            [OUT, SAMPLES, "artifacts/ranks.json", REPORT, f"{MODEL_DIR}/README.md"],
            tags={"model_md5": output_md5("truncate-and-update", MODEL_DIR)})
    return runtime


if __name__ == "__main__":
    run("evaluate", work)
