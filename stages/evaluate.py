"""evaluate: the compressed model against the cached dense baseline; metrics + one MLflow run.
With model.load by-layer and a streamed perplexity, the model is read a layer at a time
(svdcore.evaluation.streams_by_layer); with evaluate.device_map auto, zero-shot scoring and
generation load it again, spread over the devices (svdcore.spread)."""
from svdcore.atomic import read_json, write_json
from svdcore.checkpoint import open_compressed
from svdcore.errors import UserError
from svdcore.counts import linear_parameters, ratio_achieved
from svdcore.evaluation import directory_bytes, measure, streams_by_layer
from svdcore.generation import check_same_prompts, side_by_side
from svdcore.model import resolve_device, resolve_dtype
from svdcore.spread import spread_model
from svdcore.zeroshot import check_same_protocol
from stages.common import STAGE_METRICS, peak_memory, run, wall_s
from stages.io import DENSE, DENSE_SAMPLES, MODEL_DIR, REPORT
from stages.tracking import log_run, output_md5

OUT = "metrics/evaluate.json"
SAMPLES = "metrics/samples.json"


def work(params):
    from transformers import AutoTokenizer

    device = resolve_device(params.device)  # first: a bad device fails before any slow work
    zs, gen = params.zeroshot, params.generate
    dense = read_json(DENSE, "dense baseline")
    check_same_protocol(dense.get("zeroshot", {}), zs.tasks, zs.limit, DENSE)
    dense_samples = read_json(DENSE_SAMPLES, "dense generation samples")
    check_same_prompts(dense_samples, gen.prompts, gen.max_new_tokens, DENSE_SAMPLES)
    ranks = read_json("artifacts/ranks.json", "ranks")
    report = read_json(REPORT, "compression report")
    dtype = resolve_dtype(params.model.dtype, device)
    model, by_layer = open_compressed(MODEL_DIR, dtype,
                                      "by-layer" if streams_by_layer(params) else "whole", device)
    if linear_parameters(model) != ranks["linear_params_compressed"]:
        raise UserError(f"{MODEL_DIR} does not hold the ranks of artifacts/ranks.json; rerun truncate-and-update")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    compressed, runtime = measure(model, tokenizer, params, device, "compressed", by_layer=by_layer,
                                  spread=lambda: spread_model(MODEL_DIR, dtype, params.evaluate.max_memory, device, True))
    samples = compressed.pop("samples")
    compressed["bytes_on_disk"] = directory_bytes(MODEL_DIR)
    metrics = {
        "dense": dense,
        "compressed": compressed,
        "ratio": {"target": params.compress.ratio, **ratio_achieved(dense, compressed)},
        "whitening_routes": {"matrices": report["route_counts"], "grams": report["gram_route_counts"]},
    }
    write_json(OUT, metrics)
    write_json(SAMPLES, {"max_new_tokens": gen.max_new_tokens,
                         "samples": side_by_side(dense_samples["samples"], samples)})

    # the latest wall time and memory of every stage in this workspace (the optional quantize stage's
    # too, when it ran): read, never depended on, so that wall times do not enter this stage's run-cache key
    stages = {path.stem: read_json(path, f"{path.stem} timings") for path in sorted(STAGE_METRICS.glob("*.json"))
              if path.stem != "evaluate"}
    stages["evaluate"] = {**runtime, "wall_s": wall_s(), **peak_memory()}
    # the model version and the run find each other: the run is tagged with the model's DVC hash
    log_run(params.mlflow.experiment, params.model_dump(), {**metrics, "stages": stages},
            [OUT, SAMPLES, "artifacts/ranks.json", REPORT, f"{MODEL_DIR}/README.md"],
            tags={"model_md5": output_md5("truncate-and-update", MODEL_DIR)})
    return runtime


if __name__ == "__main__":
    run("evaluate", work)
