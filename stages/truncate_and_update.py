"""truncate-and-update: factorize every allocated linear and save the compressed model."""
import torch

from svdcore.atomic import atomic_path, read_json, write_json
from svdcore.card import model_card
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes
from svdcore.errors import UserError
from svdcore.fisher import load_fisher
from svdcore.lowrank import save_compressed
from svdcore.methods import recipe_from_params
from svdcore.model import checkpoint_dtype, load_model, load_tokenizer, resolve_device, resolve_dtype
from svdcore.ranks import check_ranks
from stages.common import run
from stages.io import MODEL_DIR, REPORT, load_calibration
from stages.tracking import git_sha, repository_root

FISHER = "artifacts/fisher.safetensors"


def work(params):
    device = resolve_device(params["device"])  # first: a bad device fails before any slow work
    compress = params["compress"]
    recipe = recipe_from_params(compress)
    allocation = read_json("artifacts/ranks.json", "ranks")  # checked before the slow model load
    for key, param, wanted in (("ratio", "ratio", compress["ratio"]), ("rank_multiple", "rank_multiple", compress["rank_multiple"]),
                               ("strategy", "allocation", recipe.allocation)):
        if allocation.get(key) != wanted:
            raise UserError(f"ranks: artifacts/ranks.json was allocated for compress.{param} {allocation.get(key)!r}, "
                            f"params.yaml says {wanted!r}; rerun allocate-ranks")
    check_ranks(allocation.get("ranks"), allocation.get("shapes") or {}, "artifacts/ranks.json")
    model = load_model(params["model"]["name"], resolve_dtype(params["model"]["dtype"], device))
    tokenizer = load_tokenizer(params["model"]["name"])
    if allocation.get("shapes") != linear_shapes(model):
        raise UserError("ranks: artifacts/ranks.json was made for other linears than this model's; "
                        "rerun compute-covariances and allocate-ranks")
    windows = load_calibration() if recipe.needs_windows else None
    fisher = load_fisher(FISHER, model) if recipe.needs_fisher else None
    cov = params["covariances"]
    report = compress_model(model, allocation["ranks"], recipe, "artifacts/stats", device, windows, cov["batch_size"],
                            route=compress["route"], offload=cov["offload_activations"], fisher=fisher)
    save_dtype = compress["save_dtype"]
    save_dtype = checkpoint_dtype(params["model"]["name"]) if save_dtype == "auto" else getattr(torch, save_dtype)
    card = model_card(params, recipe.describe(), allocation, str(save_dtype).removeprefix("torch."),
                      git_sha(repository_root()))
    with atomic_path(MODEL_DIR, is_dir=True) as tmp:
        save_compressed(model, tokenizer, tmp, extra={"method": compress["method"], "ratio": compress["ratio"],
                                                      **recipe.describe()}, dtype=save_dtype)
        (tmp / "README.md").write_text(card)
    write_json(REPORT, report)
    return {}


if __name__ == "__main__":
    run("truncate-and-update", work)
