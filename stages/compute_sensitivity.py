"""compute-sensitivity: the end-to-end cost of dropping each whitened component of every linear
(svdcore.sensitivity), for the sensitivity allocation; only when the method allocates by it (else
an empty file, so that switching methods costs nothing here). The sweep runs it with --always."""
from functools import partial

from svdcore.methods import recipe_from_params
from svdcore.sensitivity import component_costs, save_costs
from stages.common import gated_work, run_gated

OUT = "artifacts/sensitivity.safetensors"


def needed(params) -> bool:
    return recipe_from_params(params.compress).allocation == "sensitivity"


def compute(params, model, windows, device) -> dict:
    sens = params.sensitivity
    return component_costs(model, windows[:sens.samples], "artifacts/stats", device,  # all when fewer
                           params.covariances.batch_size, sens.seed)


gated = partial(gated_work, needed, compute, save_costs)  # (out, always) -> the work
work = gated(OUT)  # as the command runs it, for callers in process


if __name__ == "__main__":
    run_gated("compute-sensitivity", __doc__, OUT, gated)
