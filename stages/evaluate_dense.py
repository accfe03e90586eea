"""evaluate-dense: the uncompressed baseline, computed once per model and evaluation setting:
perplexity, zero-shot accuracy, and the generation samples the compressed model is shown beside.
With model.load by-layer and a streamed perplexity, the model is read a layer at a time
(svdcore.evaluation.streams_by_layer); with evaluate.device_map auto, zero-shot scoring and
generation load it again, spread over the devices (svdcore.spread)."""
from pathlib import Path

from svdcore.atomic import write_json
from svdcore.checkpoint import open_model
from svdcore.evaluation import directory_bytes, measure, streams_by_layer
from svdcore.model import load_tokenizer, resolve, resolve_device, resolve_dtype, weight_bytes
from svdcore.spread import spread_model
from stages.common import run
from stages.io import DENSE, DENSE_SAMPLES


def work(params):
    device = resolve_device(params.device)  # first: a bad device fails before any slow work
    name = params.model.name
    dtype = resolve_dtype(params.model.dtype, device)
    model, by_layer = open_model(name, dtype, "by-layer" if streams_by_layer(params) else "whole", device)
    metrics, runtime = measure(model, load_tokenizer(name), params, device, "dense", by_layer=by_layer,
                               spread=lambda: spread_model(name, dtype, params.evaluate.max_memory, device))
    samples = metrics.pop("samples")
    source = resolve(name)
    local = Path(source.path) / (source.gguf_file or "")
    if local.exists():  # a hub id has no local file to measure
        metrics["bytes_source"] = directory_bytes(local)
    metrics["bytes_weights"] = weight_bytes(model)
    write_json(DENSE, metrics)
    write_json(DENSE_SAMPLES, {"max_new_tokens": params.generate.max_new_tokens, "samples": samples})
    return runtime


if __name__ == "__main__":
    run("evaluate-dense", work)
