"""Loss-aware allocation's measurement: what each whitened component of each linear costs the
model's output distribution if it is dropped, in the end-to-end currency (KL to the dense model).

Truncating a linear to rank r (whitening, or its equivalent output PCA) removes the output
directions u_i, i > r, the eigenvectors of W G W^T with energies sigma_i^2 (G the Gram of the
dense inputs per token). KL(dense || compressed) has zero gradient at the dense model, so its
leading term is second order: 1/2 dY^T F dY, with F the Fisher of the output distribution with
respect to the linear's outputs Y. Under the Kronecker (KFAC) approximation, inputs independent
of output gradients, dropping component i costs

    c_i = 1/2 sigma_i^2 h_i,   h_i = E_t[(g_t . u_i)^2],

where g_t is the gradient of the log-likelihood of a label drawn from the dense model's own
prediction at token t (E over the draw is exactly F). One backward pass over the calibration
windows gives h for every linear at once. F contains every later layer's Jacobian: an early
linear whose error propagates is priced higher, which is what the per-linear whitened loss (V2's
currency) misses. The costs do not depend on the ratio, so they are computed once (the
compute-sensitivity stage) and every ratio is a cheap solve (svdcore.ranks.sensitivity_ranks).
"""
import torch
import torch.nn.functional as F

from .atomic import load_tensors, save_tensors
from .covariances import load_layer
from .decompose import whitening
from .errors import UserError
from .model import decoder_layers, layer_linears, layer_prefix, weight_matrix
from .progress import progress as tqdm


def output_basis(weight: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma^2 descending, U) of W G W^T on its nonzero side: U is m x min(m, n). For m > n it
    comes from the n x n problem, U = W S V diag(sigma)^-1 with S a factor of G."""
    weight, gram = weight.double(), gram.double()
    m, n = weight.shape
    if m <= n:
        sym = weight @ gram @ weight.T
        energy, basis = torch.linalg.eigh((sym + sym.T) / 2)
        return energy.flip(0).clamp_min(0), basis.flip(1)
    ws = whitening(gram).apply(weight)
    energy, right = torch.linalg.eigh(ws.T @ ws)
    energy, right = energy.flip(0).clamp_min(0), right.flip(1)
    sigma = energy.sqrt().clamp_min(energy.max().sqrt().clamp_min(1e-300) * 1e-12)
    return energy, (ws @ right) / sigma


def component_costs(model, windows: torch.Tensor, stats_dir, device: torch.device, batch_size: int,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Linear name -> c (float64, CPU), the predicted KL per token of dropping each whitened
    component, in descending order of sigma. The whole model runs forward and backward on the
    device (as for the Fisher scales); only activation gradients are computed, no weight's."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    modules, energies, bases = {}, {}, {}
    for index, layer in enumerate(tqdm(layers, desc="output bases", unit="layer")):
        stats = load_layer(stats_dir, index)
        for local, module in layer_linears(layer).items():
            name = f"{prefix}.{index}.{local}"
            if local not in stats.shares:
                raise UserError(f"statistics: no Gram for {name}; the statistics do not match this model",
                                artifact=stats.source)
            gram = stats.grams[stats.shares[local]].to(device) / stats.tokens
            energies[name], basis = output_basis(weight_matrix(module).detach().to(device), gram)
            bases[name], modules[name] = basis.float(), module
    sums = {name: torch.zeros(b.shape[1], dtype=torch.float64, device=device) for name, b in bases.items()}

    def watch(name):
        def forward_hook(module, args, out):
            def backward_hook(grad):
                sums[name].add_((grad.reshape(-1, grad.shape[-1]).float() @ bases[name]).square().sum(0, dtype=torch.float64))
            out.register_hook(backward_hook)
        return forward_hook

    def track(module, args, out):  # the graph starts at the embeddings: no weight needs a gradient
        return out.detach().requires_grad_()

    home = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(watch(n)) for n, m in modules.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(track))
    generator = torch.Generator(device).manual_seed(seed)
    try:
        model.to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        for batch in tqdm(windows.split(batch_size), desc="sensitivity", unit="batch"):
            with torch.enable_grad():
                logits = model(batch.to(device), use_cache=False).logits.float()
                if not torch.isfinite(logits).all():
                    raise UserError("sensitivity: non-finite logits on a calibration batch; try model.dtype float32")
                flat = logits.reshape(-1, logits.shape[-1])
                with torch.no_grad():
                    labels = torch.multinomial(flat.softmax(-1), 1, generator=generator).squeeze(1)
                F.cross_entropy(flat, labels, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.to(home)
    tokens = windows.numel()
    return {name: (0.5 * energies[name] * sums[name] / tokens).cpu() for name in bases}


def save_costs(path, costs: dict[str, torch.Tensor]) -> None:
    save_tensors(path, costs)


def load_costs(path, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """The component costs of `path`; with `shapes`, checked to hold those of each linear of it and no other."""
    return load_tensors(path, "sensitivity", shapes)
