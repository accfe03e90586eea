"""compute-fisher: FWSVD's Fisher scales, only when the method uses the fisher metric (else an
empty file, so that switching methods costs nothing here). The sweep runs it with --always."""
import argparse
from pathlib import Path

from svdcore.atomic import atomic_path
from svdcore.fisher import fisher_scales, save_fisher
from svdcore.methods import recipe_from_params
from svdcore.model import load_model, resolve_device, resolve_dtype
from stages.common import STAGE_METRICS, run
from stages.io import load_calibration

OUT = "artifacts/fisher.safetensors"


def compute(params, out: str, always: bool) -> dict:
    device = resolve_device(params["device"])
    scales = {}
    if always or recipe_from_params(params["compress"]).needs_fisher:
        model = load_model(params["model"]["name"], resolve_dtype(params["model"]["dtype"], device))
        scales = fisher_scales(model, load_calibration(), params["covariances"]["batch_size"], device)
    with atomic_path(out) as tmp:
        save_fisher(tmp, scales)
    return {"device": str(device), "matrices": len(scales)}


def work(params):
    return compute(params, OUT, always=False)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("--always", action="store_true", help="compute whatever compress.method is")
    cli.add_argument("--out", default=OUT)
    cli.add_argument("--timings-dir", default=str(STAGE_METRICS))
    args = cli.parse_args()
    run("compute-fisher", lambda params: compute(params, args.out, args.always), Path(args.timings_dir))
