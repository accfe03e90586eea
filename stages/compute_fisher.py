"""compute-fisher: FWSVD's Fisher scales, only when the method uses the fisher metric (else an
empty file, so that switching methods costs nothing here). The sweep runs it with --always."""
from functools import partial

from svdcore.fisher import fisher_scales, save_fisher
from svdcore.methods import recipe_from_params
from stages.common import gated_work, run_gated

OUT = "artifacts/fisher.safetensors"


def needed(params) -> bool:
    return recipe_from_params(params.compress).needs_fisher


def compute(params, model, windows, device) -> dict:
    return fisher_scales(model, windows, params.covariances.batch_size, device)


gated = partial(gated_work, needed, compute, save_fisher)  # (out, always) -> the work
work = gated(OUT)  # as the command runs it, for callers in process


if __name__ == "__main__":
    run_gated("compute-fisher", __doc__, OUT, gated)
