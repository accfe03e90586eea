"""compute-sensitivity: the end-to-end cost of dropping each whitened component of every linear
(svdcore.sensitivity), for the sensitivity allocation; only when the method allocates by it (else
an empty file, so that switching methods costs nothing here). The sweep runs it with --always."""
from svdcore.methods import recipe_from_params
from svdcore.sensitivity import component_costs, save_costs
from stages.common import gated_work, run_gated
from stages.io import load_calibration

OUT = "artifacts/sensitivity.safetensors"


def needed(params) -> bool:
    return recipe_from_params(params["compress"]).allocation == "sensitivity"


def compute(params, model, device) -> dict:
    sens = params["sensitivity"]
    windows = load_calibration()[:sens["samples"]]  # all of them when there are fewer
    return component_costs(model, windows, "artifacts/stats", device, params["covariances"]["batch_size"],
                           sens["seed"])


work = gated_work(needed, compute, save_costs, OUT)  # as the command runs it, for callers in process


if __name__ == "__main__":
    run_gated("compute-sensitivity", __doc__, OUT, needed, compute, save_costs)
