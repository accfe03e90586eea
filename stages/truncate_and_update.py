"""truncate-and-update: factorize every allocated linear and save the compressed model.

With more than one process asked for (`distributed.nproc_per_node` x `.nnodes`) the stage starts
itself again under torchrun (stages.common.under_torchrun): each process streams its part of every
calibration batch through the layer loop, which sums the statistics, splits the factorizations and
averages the refinement's gradients over the processes (svdcore.distributed); rank 0 alone
writes."""
from svdcore import distributed
from svdcore.atomic import read_json, write_json
from svdcore.errors import UserError
from svdcore.methods import recipe_from_params
from svdcore.model import load_tokenizer, resolve_device
from svdcore.ranks import check_ranks
from stages.common import run, under_torchrun
from stages.compression import compress_and_save
from stages.io import MODEL_DIR, REPORT


def work(params):
    resolve_device(params.device)  # first: a bad device fails before any slow work
    compress = params.compress
    recipe = recipe_from_params(compress)
    allocation = read_json("artifacts/ranks.json", "ranks")  # checked before the slow model load
    for key, param, wanted in (("ratio", "ratio", compress.ratio), ("rank_multiple", "rank_multiple", compress.rank_multiple),
                               ("strategy", "allocation", recipe.allocation)):
        if allocation.get(key) != wanted:
            raise UserError(f"ranks: artifacts/ranks.json was allocated for compress.{param} {allocation.get(key)!r}, "
                            f"params.yaml says {wanted!r}; rerun allocate-ranks")
    check_ranks(allocation.get("ranks"), allocation.get("shapes") or {}, "artifacts/ranks.json")
    under_torchrun(params, "stages.truncate_and_update")
    tokenizer = load_tokenizer(params.model.name)  # saved beside the model; before the slow work
    try:
        report, summary = compress_and_save(params, recipe, allocation, "artifacts/fisher.safetensors", tokenizer,
                                            MODEL_DIR)
        if distributed.env_rank() == 0:
            write_json(REPORT, report)
    finally:
        distributed.leave()
    return {"compress_s": summary["compress_s"], "processes": distributed.env_world_size(),
            "rank": distributed.env_rank()}


if __name__ == "__main__":
    run("truncate-and-update", work)
