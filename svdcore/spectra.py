"""Whitened spectra: the squared singular values of W S (S S^T = G / N) for every linear.

They price every truncation at once: dropping all but the top r costs the sum of the rest
(SVD-LLM's identity), whatever the ratio. So they are computed once per model and statistics,
and the V2 allocation reads them for any ratio. G is divided by the token count N, so the
figures do not grow with the calibration set.
"""
import torch

from .atomic import load_tensors, save_tensors
from .checkpoint import layer_read
from .covariances import load_layer
from .decompose import whitening
from .model import decoder_layers, layer_linears, layer_prefix, weight_matrix
from .progress import progress as tqdm


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of W G W^T, descending, on the smaller side: W G W^T (m <= n), else
    (W S)^T (W S) with S a factor of G (the same nonzero eigenvalues)."""
    weight, gram = weight.double(), gram.double()
    m, n = weight.shape
    if m <= n:
        sym = weight @ gram @ weight.T
    else:
        ws = whitening(gram).apply(weight)
        sym = ws.T @ ws
    return torch.linalg.eigvalsh((sym + sym.T) / 2).flip(0).clamp_min(0)


def whitened_spectra(model, stats_dir, device: torch.device, by_layer=None) -> dict[str, torch.Tensor]:
    """Linear name -> its whitened spectrum (float64, CPU), one layer's statistics at a time
    (`by_layer`, svdcore.checkpoint.ByLayer: and one layer's weights, read as they are reached)."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    spectra = {}
    for index, layer in enumerate(tqdm(layers, desc="spectra", unit="layer")):
        stats = load_layer(stats_dir, index)
        grams = {g: (v / stats.tokens).to(device) for g, v in stats.grams.items()}
        with layer_read(by_layer, layer):
            for local, module in layer_linears(layer).items():
                weight = weight_matrix(module).detach().to(device)
                spectra[f"{prefix}.{index}.{local}"] = whitened_spectrum(weight, grams[stats.shares[local]]).cpu()
    return spectra


def save_spectra(path, spectra: dict[str, torch.Tensor]) -> None:
    save_tensors(path, spectra)


def load_spectra(path, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """The spectra of `path`; with `shapes`, checked to hold one for each linear of it and no other."""
    return load_tensors(path, "spectra", shapes)
