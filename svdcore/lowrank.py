"""Swap compressed linears into a model, save it as a Hugging Face model, load it back."""
import json
import re
from pathlib import Path

from torch import nn

from . import modeling_svdcore
from .errors import UserError
from .model import LOAD_ERRORS
from .modeling_svdcore import FACTORS, LowRankLinear, install_low_rank

MODELING_FILE = Path(modeling_svdcore.__file__)


def replace_linear(model: nn.Module, name: str, a, b) -> None:
    """Put factors A (out x rank) and B (rank x in) in place of the nn.Linear called `name`."""
    bias = model.get_submodule(name).bias
    install_low_rank(model, {name: a.shape[1]})
    low = model.get_submodule(name)
    low.A.data.copy_(a.to(low.A.dtype))  # narrowed where the factors are (a GPU), then copied
    low.B.data.copy_(b.to(low.B.dtype))
    if bias is not None:
        low.expand.bias.data.copy_(bias.data)


def low_rank_ranks(model: nn.Module) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def save_compressed(model: nn.Module, tokenizer, directory, extra: dict | None = None, dtype=None,
                    shards=None) -> None:
    """save_pretrained (safetensors) + the ranks in config.json + the modeling file in auto_map.
    `dtype`: what the weights are stored in (the model is cast to it in place); None keeps the
    model's own. from_pretrained(dtype=...) computes in any dtype whatever the stored one.
    `shards` (svdcore.checkpoint.ShardWriter): the decoder layers were written to it as they were
    compressed (model.load by-layer); it writes the rest, and this function the files around them."""
    directory = Path(directory)
    if dtype is not None and shards is None:
        model.to(dtype)
    base = type(model).__name__
    config = model.config
    config.svdcore = {"base_architecture": base, "factors": FACTORS,
                      "ranks": dict(sorted(low_rank_ranks(model).items())), **(extra or {})}
    config.auto_map = {"AutoModelForCausalLM": "modeling_svdcore.SVDCoreForCausalLM"}
    try:
        if shards is None:
            model.save_pretrained(directory, safe_serialization=True)
        else:  # what save_pretrained writes besides the weights
            shards.finish(model)
            config.architectures = [base]
            if dtype is not None:
                config.dtype = dtype
            config.save_pretrained(directory)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(directory)
    finally:  # the in-memory model keeps its own class; only the saved config points elsewhere
        del config.auto_map, config.svdcore
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    source = MODELING_FILE.read_text()
    source = re.sub(r'^BASE_ARCHITECTURE = ".*?"', f'BASE_ARCHITECTURE = "{base}"', source, count=1, flags=re.M)
    (directory / "modeling_svdcore.py").write_text(source)


def compressed_class(directory):
    """(config, model class) of a compressed model saved by save_compressed, checked."""
    from transformers import AutoConfig

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"compressed model: {config_path} is missing")
    svd = json.loads(config_path.read_text()).get("svdcore")
    if not svd:
        raise UserError(f"compressed model: {config_path} has no svdcore section (not made by svdcore)")
    if svd.get("factors") != FACTORS:  # before 2026-12: bare parameters A and B, not two nn.Linear
        raise UserError(f"compressed model: {directory} was saved with factors {svd.get('factors')!r}, not 'linear' "
                        f"(before, svdcore saved bare parameters A and B); load it with transformers and "
                        f"trust_remote_code=True, or redo it", artifact=directory)
    return AutoConfig.from_pretrained(directory), modeling_svdcore.low_rank_class(svd["base_architecture"])


def load_compressed(directory, dtype=None):
    """Load a compressed model without trust_remote_code (the classes come from svdcore)."""
    config, cls = compressed_class(directory)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = cls.from_pretrained(directory, config=config, **kwargs)
    except (*LOAD_ERRORS, RuntimeError) as e:
        raise UserError(f"compressed model: cannot load {directory}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model
