"""The tail of the pipeline, one path for every caller: the model compressed to an allocation's
ranks (truncate-and-update; a sweep point's, with its own allocation, for the sweep's compress stage
and bench.zeroshot, always in memory), and the compressed model saved with its card. With
`model.load: by-layer` truncate-and-update never holds the whole model: each decoder layer is
read from the checkpoint, compressed and written to its shard in turn (svdcore.checkpoint). Under
torchrun every process runs the same compression on its part of the calibration batches
(svdcore.distributed) and rank 0 alone writes."""
import time

import torch

from svdcore import distributed
from svdcore.atomic import atomic_path, json_text
from svdcore.card import model_card
from svdcore.checkpoint import ShardWriter, open_model
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes
from svdcore.counts import parameter_counts, ratio_achieved
from svdcore.errors import UserError
from svdcore.fisher import load_fisher
from svdcore.lowrank import save_compressed
from svdcore.methods import Recipe, recipe_from_params
from svdcore.model import checkpoint_dtype, resolve_device, resolve_dtype
from svdcore.params import Params
from stages.allocation import LINEARS, allocation_for
from stages.io import load_calibration
from stages.sweep_params import sweep_compress
from stages.tracking import git_sha, repository_root

STATS = "artifacts/stats"
# the sweep computes the Fisher scales and the component costs whatever compress.method says
SWEEP_FISHER = "sweep/artifacts/fisher.safetensors"
SWEEP_SENSITIVITY = "sweep/artifacts/sensitivity.safetensors"


def compress_in_memory(params: Params, recipe: Recipe, allocation: dict, fisher_path: str, load: str = "whole",
                       shards: ShardWriter | None = None):
    """(model, report, summary): params.yaml's model compressed in memory to `allocation`'s ranks by
    `recipe`, from the main pipeline's statistics (and the Fisher scales of `fisher_path` when the recipe
    reads them). The report is compress_model's; the summary holds the parameter counts before and
    after, the ratio achieved (against the model as loaded: no dense evaluation needed) and the
    compression's wall time (compress_s). With `load` by-layer, the model's decoder layers are read
    and compressed one at a time (and written to `shards` if given): the model returned holds only
    what lies outside them (write_model writes it)."""
    device = distributed.join(resolve_device(params.device))
    dtype = resolve_dtype(params.model.dtype, device)
    model, by_layer = open_model(params.model.name, dtype, load, device)
    if shards is not None:
        by_layer.on_done = shards.write_layer
    if allocation.get("shapes") != linear_shapes(model):
        raise UserError(f"ranks: the allocation was made from {LINEARS}, which lists other linears than this "
                        f"model's", artifact=LINEARS)
    cov = params.covariances
    windows, batch_size = (distributed.shard(load_calibration(), cov.batch_size) if recipe.needs_windows
                           else (None, cov.batch_size))
    fisher = load_fisher(fisher_path, model) if recipe.needs_fisher else None
    dense = parameter_counts(model)
    start = time.perf_counter()
    report = compress_model(model, allocation["ranks"], recipe, STATS, device, windows, batch_size,
                            route=params.compress.route, offload=cov.offload_activations, fisher=fisher,
                            by_layer=by_layer)
    compress_s = round(time.perf_counter() - start, 2)
    compressed = parameter_counts(model)
    return model, report, {"dense": dense, "compressed": compressed,
                           "ratio_achieved": ratio_achieved(dense, compressed), "compress_s": compress_s}


def save_dtype(params: Params) -> torch.dtype:
    """compress.save_dtype, auto resolved to the source checkpoint's."""
    dtype = params.compress.save_dtype
    return checkpoint_dtype(params.model.name) if dtype == "auto" else getattr(torch, dtype)


def save_with_card(params: Params, recipe: Recipe, allocation: dict, model, tokenizer, directory: str,
                   extra_files: dict | None = None) -> None:
    """The compressed model in compress.save_dtype (auto: the source checkpoint's), with its model
    card and `extra_files` ({name: data} as JSON), written whole or not at all."""
    with atomic_path(directory, is_dir=True) as tmp:
        write_model(tmp, params, recipe, allocation, model, tokenizer, None, extra_files)


def write_model(tmp, params: Params, recipe: Recipe, allocation: dict, model, tokenizer, shards: ShardWriter | None,
                extra_files: dict | None = None) -> None:
    """save_with_card's files, in the folder `tmp` (which `shards` wrote the layers into, if given)."""
    compress = params.compress
    dtype = save_dtype(params) if shards is None else shards.dtype
    card = model_card(params, recipe.describe(), allocation, str(dtype).removeprefix("torch."),
                      git_sha(repository_root()))
    save_compressed(model, tokenizer, tmp, extra={"method": compress.method, "ratio": compress.ratio,
                                                  **recipe.describe()}, dtype=dtype, shards=shards)
    (tmp / "README.md").write_text(card)
    for name, data in (extra_files or {}).items():
        (tmp / name).write_text(json_text(data))


def compress_and_save(params: Params, recipe: Recipe, allocation: dict, fisher_path: str, tokenizer, directory: str):
    """(report, summary): compress_in_memory, then save_with_card into `directory`; with `model.load:
    by-layer`, each layer written as it is compressed (the folder appears whole or not at all
    either way). Under torchrun, a process other than rank 0 compresses and writes nothing."""
    if distributed.env_rank() != 0:
        return compress_in_memory(params, recipe, allocation, fisher_path, params.model.load)[1:]
    if params.model.load == "whole":
        model, report, summary = compress_in_memory(params, recipe, allocation, fisher_path)
        save_with_card(params, recipe, allocation, model, tokenizer, directory)
        return report, summary
    with atomic_path(directory, is_dir=True) as tmp:
        shards = ShardWriter(tmp, save_dtype(params))
        model, report, summary = compress_in_memory(params, recipe, allocation, fisher_path, "by-layer", shards)
        write_model(tmp, params, recipe, allocation, model, tokenizer, shards)
    return report, summary


def compress_point(params: Params, method: str, ratio: float):
    """(model, point): a sweep point's model compressed in memory: `method` (a preset, or a preset
    with +update) at `ratio`, from the main pipeline's statistics and the sweep's Fisher scales and
    component costs. `point` holds its params (compress is the preset's: stages.sweep_params.sweep_compress),
    recipe, allocation and what the allocation decided, and compress_in_memory's report and summary."""
    params = params.model_copy(update={"compress": sweep_compress(params.compress, method, ratio)})
    recipe = recipe_from_params(params.compress)
    allocation, decided = allocation_for(params.compress, recipe, SWEEP_SENSITIVITY)
    model, report, summary = compress_in_memory(params, recipe, allocation, SWEEP_FISHER)
    return model, {"params": params, "recipe": recipe, "allocation": allocation, "decided": decided,
                   "report": report, "summary": summary}
