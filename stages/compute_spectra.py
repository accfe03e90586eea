"""compute-spectra: the whitened spectrum of every linear, for any ratio (V2 allocation reads it)."""
from svdcore.atomic import atomic_path
from svdcore.checkpoint import open_model
from svdcore.model import resolve_device, resolve_dtype
from svdcore.spectra import save_spectra, whitened_spectra
from stages.common import run

OUT = "artifacts/spectra.safetensors"


def work(params):
    device = resolve_device(params.device)
    dtype = resolve_dtype(params.model.dtype, device)
    model, by_layer = open_model(params.model.name, dtype, params.model.load, device)
    spectra = whitened_spectra(model, "artifacts/stats", device, by_layer)
    with atomic_path(OUT) as tmp:
        save_spectra(tmp, spectra)
    return {"device": str(device), "matrices": len(spectra)}


if __name__ == "__main__":
    run("compute-spectra", work)
