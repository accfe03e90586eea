"""Compress a model that does not fit in memory (`model.load: by-layer`; the design notes, section 8).

The model is built on the meta device: parameters without storage, buffers (rotary tables, masks)
real. The tensors outside the decoder layers (embeddings, final norm, head) are read from the
safetensors checkpoint at once; a decoder layer's are read when the layer loop reaches it, straight
onto the device, and dropped (back to meta) once the loop is done with it, after the compressed
layer has been written to a shard of its own. Peak memory is then one layer, the calibration
activations and the outside tensors, whatever the model's depth.
"""
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .model import decoder_layers, gguf_cache, layer_prefix, load_model, resolve
from .streaming import Serial, _to_device
from .timing import section

META = torch.device("meta")


@contextmanager
def parameters_on_meta():
    """Every parameter a module registers meanwhile goes to the meta device (its initialisation
    then costs nothing); buffers stay real, so what a model computes at construction (rotary
    frequencies, causal masks) is there. A parameter already on meta is kept as it is, so that
    tied weights stay one object."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to(META), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an indexed set of shards), read one at a
    time. Names are the model's state_dict names; a checkpoint that leaves out the base model's
    prefix (GPT-2's `h.0...` for `transformer.h.0...`) is matched too."""

    def __init__(self, directory, base_prefix: str = ""):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if single.is_file():  # preferred, as from_pretrained prefers it
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            raise UserError(f"model.load: by-layer reads safetensors, and {self.directory} has neither "
                            f"model.safetensors nor model.safetensors.index.json (use model.load whole)")
        self.base_prefix = f"{base_prefix}." if base_prefix else ""

    def find(self, name: str) -> str | None:
        if name in self.files:
            return name
        bare = name.removeprefix(self.base_prefix)
        return bare if self.base_prefix and bare in self.files else None

    def read(self, name: str, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
        """One tensor, in memory of its own. On a CPU safetensors hands out a view of the file's
        memory map; the pages it touches stay resident, counted in the process's memory, for as long
        as the map is open, so the map is closed after every read and the tensor copied out of it."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.files[name]), framework="pt", device=str(device)) as f:
                tensor = f.get_tensor(name)
        except (OSError, SafetensorError) as e:  # a missing or damaged shard
            raise UserError(f"model: cannot read {name} from {self.files[name]}: {str(e).splitlines()[0]}",
                            artifact=self.directory) from None
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor.clone() if tensor.device.type == "cpu" else tensor


def fill(root: nn.Module, root_name: str, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
         skip: nn.Module | None = None) -> list[tuple[nn.Module, str]]:
    """Give every meta parameter of `root` (named `root_name` inside the model, "" for the model)
    its tensor from the checkpoint, on `device` in `dtype`, checked for shape and finiteness; a
    parameter tied under several names is read once and stays tied. Persistent buffers the
    checkpoint holds are read too (the others keep what the model computed). Modules inside `skip`
    are left alone. Returns the (module, name) of every buffer read."""
    skipped = set() if skip is None else {id(m) for m in skip.modules()}
    slots, buffers = {}, []  # slots: id -> (parameter, [(module, attribute, full name)])
    for module_name, module in root.named_modules(remove_duplicate=False):
        if id(module) in skipped:
            continue
        full = f"{root_name}.{module_name}" if root_name and module_name else root_name or module_name
        for attr, p in module._parameters.items():
            if p is not None and p.device.type == "meta":
                slots.setdefault(id(p), (p, []))[1].append((module, attr, f"{full}.{attr}" if full else attr))
        for attr, b in module._buffers.items():
            found = b is not None and attr not in module._non_persistent_buffers_set and \
                checkpoint.find(f"{full}.{attr}" if full else attr)
            if found:
                module._buffers[attr] = checkpoint.read(found, device, b.dtype if b.is_floating_point() else None)
                buffers.append((module, attr))
    for p, places in slots.values():
        found = next(filter(None, (checkpoint.find(name) for _, _, name in places)), None)
        name = places[0][2]
        if found is None:
            raise UserError(f"model: the checkpoint in {checkpoint.directory} has no tensor {name}",
                            artifact=checkpoint.directory)
        tensor = checkpoint.read(found, device, dtype if p.is_floating_point() else None)
        if tensor.shape != p.shape:
            raise UserError(f"model: the checkpoint's {found} is {tuple(tensor.shape)}, the model's {name} is "
                            f"{tuple(p.shape)}", artifact=checkpoint.directory)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"model: the weight {name} has non-finite values (NaN or inf); the checkpoint is broken")
        loaded = nn.Parameter(tensor, requires_grad=p.requires_grad)
        for module, attr, _ in places:
            module._parameters[attr] = loaded
    return buffers


def release(layer: nn.Module, buffers: list[tuple[nn.Module, str]] = ()) -> None:
    """Drop the storage of every parameter of `layer`, and of the `buffers` fill read, back to meta
    (shapes kept; a parameter tied under several names stays one)."""
    metas = {}
    for module in layer.modules():
        for attr, p in module._parameters.items():
            if p is not None and p.device.type != "meta":
                module._parameters[attr] = metas.setdefault(
                    id(p), nn.Parameter(p.detach().to(META), requires_grad=p.requires_grad))
    for module, attr in buffers:
        module._buffers[attr] = module._buffers[attr].to(META)


def checkpoint_directory(name: str, dtype: torch.dtype) -> Path:
    """The directory holding `model.name`'s safetensors: the directory itself, the hub cache's
    snapshot of a hub id, or for a GGUF the Hugging Face copy svdcore keeps of it (made here, by
    reading the GGUF whole once, if it is not there yet: a GGUF has no per-tensor access)."""
    source = resolve(name)
    if source.gguf_file:
        key = f"model-{str(dtype).removeprefix('torch.')}"
        cache = gguf_cache(source, key)
        if not (cache / "config.json").is_file():
            load_model(name, dtype)  # reading the GGUF whole converts it into the cache, once
        if not (cache / "config.json").is_file():
            raise UserError(f"model.load: by-layer needs the GGUF converted into {cache}, which could not be "
                            f"written (set SVDCORE_CACHE to a writable folder, or use model.load whole)")
        return cache
    if Path(source.path).is_dir():
        return Path(source.path)
    from huggingface_hub import snapshot_download

    try:  # the json files first; then the shards the index lists (a repository may hold other copies)
        directory = Path(snapshot_download(source.path, allow_patterns=["*.json"]))
        index = directory / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        return Path(snapshot_download(source.path, allow_patterns=["*.json", *files]))
    except Exception as e:  # not on the hub, no network, no cache
        raise UserError(f"model.name: could not find the checkpoint of {source.path}: {str(e).splitlines()[0]}") \
            from None


def open_model(name: str, dtype: torch.dtype, load: str, device: torch.device):
    """(model, mover): `model.load` whole (load_model; mover None) or by-layer (load_by_layer, and
    the ByLayer mover that reads its layers onto `device`; its on_done may be set after)."""
    if load == "whole":
        return load_model(name, dtype), None
    model, checkpoint = load_by_layer(name, dtype)
    return model, ByLayer(model, checkpoint, device, dtype)


def open_compressed(directory, dtype: torch.dtype, load: str, device: torch.device):
    """open_model for a model saved by svdcore (models/compressed)."""
    from .lowrank import load_compressed

    if load == "whole":
        return load_compressed(directory, dtype=dtype), None
    model, checkpoint = load_compressed_by_layer(directory, dtype)
    return model, ByLayer(model, checkpoint, device, dtype)


def load_by_layer(name: str, dtype: torch.dtype):
    """(model, checkpoint): the model in eval mode with its decoder layers on the meta device and
    everything else read in (on the CPU, in `dtype`); ByLayer streams the layers in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = checkpoint_directory(name, dtype)
    config = AutoConfig.from_pretrained(directory)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return _fill_outside(model, directory, dtype)


def load_compressed_by_layer(directory, dtype: torch.dtype):
    """(model, checkpoint): a model saved by svdcore (models/compressed), as load_by_layer builds
    a dense one: its decoder layers, low-rank linears included, on the meta device."""
    from .lowrank import compressed_class

    config, cls = compressed_class(directory)
    with parameters_on_meta():
        model = cls._from_config(config, dtype=dtype)
    return _fill_outside(model, Path(directory), dtype)


def _fill_outside(model: nn.Module, directory: Path, dtype: torch.dtype):
    """(model, checkpoint): what lies outside the decoder layers read in, on the CPU, and the
    generation settings the checkpoint holds (from_pretrained reads them too)."""
    from transformers import GenerationConfig

    _check_plain_keys(model)
    model.eval()
    model.config.use_cache = False
    checkpoint = Checkpoint(directory, model.base_model_prefix)
    fill(model, "", checkpoint, torch.device("cpu"), dtype, skip=decoder_layers(model))
    if model.can_generate() and (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model, checkpoint


def _check_plain_keys(model: nn.Module) -> None:
    """by-layer reads and writes tensors under the model's own names; a family whose checkpoints
    transformers renames or converts on loading (fused experts of MoE models, ...) cannot be."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
    except ImportError:  # a transformers without conversions
        conversions = []
    if conversions or getattr(model, "_keys_to_ignore_on_save", None):
        raise UserError(f"model.load: by-layer reads a checkpoint under the model's own tensor names, and "
                        f"transformers converts the checkpoints of {type(model).__name__} on loading; use "
                        f"model.load whole")


@contextmanager
def layer_read(by_layer, layer: nn.Module):
    """`layer` read in for the body of the with-statement and handed on after it (by_layer None:
    the model is whole, nothing to do); for loops that visit each layer once, without streams."""
    if by_layer is None:
        yield
        return
    home = by_layer.move(layer)()
    yield
    by_layer.send_home(layer, home)


class ByLayer(Serial):
    """The layer loop's mover for a model loaded by layer: `move` reads the layer's tensors from
    the checkpoint onto the device when the loop reaches it; `send_home` hands the finished layer
    to `on_done(name, layer)` (ShardWriter.write_layer), then drops it. Moves are not overlapped with
    compute on a GPU, where reading the checkpoint is the cost anyway."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
                 on_done=None):
        if device.type == "cuda" and device.index is None:  # tensors land on cuda:N, which is not "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(device)
        self.layers = decoder_layers(model)
        self.prefix = layer_prefix(model, self.layers)
        self.checkpoint, self.dtype, self.on_done = checkpoint, dtype, on_done

    def move(self, layer: nn.Module):
        """The read happens when the loop reaches the layer (calls what this returns), not when it
        asks for it ahead: one layer in memory at a time."""
        def read():
            with section("layer reads"):
                buffers = fill(layer, f"{self.prefix}.{self._index(layer)}", self.checkpoint, self.device, self.dtype)
                return buffers, _to_device(layer, self.device)  # the buffers the model computed
        return read

    def send_home(self, layer: nn.Module, home, home_device=None) -> None:
        if self.on_done is not None:
            with section("layer writes"):
                self.on_done(f"{self.prefix}.{self._index(layer)}", layer)
        buffers, moved = home
        release(layer, buffers)
        for (module, attr), (original, _) in moved.items():
            module._buffers[attr] = original
        moved.clear()

    def _index(self, layer: nn.Module) -> int:
        return next(i for i, candidate in enumerate(self.layers) if candidate is layer)


class ShardWriter:
    """The compressed model's weights written as they are finished: one safetensors shard per
    decoder layer and one for everything else, and the index from_pretrained reads. `dtype` is
    what floating tensors are stored in; a tensor tied to one already written is left out (as
    save_pretrained does: from_pretrained ties it again)."""

    def __init__(self, directory, dtype: torch.dtype | None):
        self.directory, self.dtype = Path(directory), dtype
        self.weight_map, self.size, self.files = {}, 0, []

    def write_layer(self, name: str, layer: nn.Module) -> None:
        """ByLayer's on_done: the decoder layer `name` (model.layers.3) in a shard of its own."""
        self.write(layer.state_dict(prefix=f"{name}."))

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        shard, seen = {}, set()
        for name, t in tensors.items():
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen:  # tied: the same tensor under another name
                continue
            seen.add(key)
            t = t.detach()
            shard[name] = (t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t).contiguous().cpu()
        file = f"model-{len(self.files) + 1:05d}.safetensors"  # "-of-N" added by finish, once N is known
        save_file(shard, str(self.directory / file), metadata={"format": "pt"})
        self.files.append((file, list(shard)))
        self.size += sum(t.numel() * t.element_size() for t in shard.values())

    def finish(self, model: nn.Module) -> None:
        """Write what lies outside the decoder layers, give the shards their final names, then
        write the index."""
        layers = decoder_layers(model)
        prefix = layer_prefix(model, layers)
        self.write({name: t for name, t in model.state_dict().items() if not name.startswith(f"{prefix}.")})
        weight_map = {}
        for number, (file, names) in enumerate(self.files, 1):
            final = f"model-{number:05d}-of-{len(self.files):05d}.safetensors"
            (self.directory / file).rename(self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
