"""Zero-shot scoring and generation over a device map (evaluate.device_map auto): a model spread by
accelerate, here over CPU memory and a disk offload folder, scores and writes what it scores and
writes whole, dense or compressed."""
import contextlib

import pytest
import torch

from conftest import DEFAULTS, tiny_tokenizer, with_value
from svdcore import params as params_module
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes
from svdcore.evaluation import measure
from svdcore.generation import generate_samples
from svdcore.lowrank import load_compressed, save_compressed
from svdcore.model import decoder_layers, load_model
from svdcore.ranks import uniform_ranks
from svdcore.spread import accelerate_memory, spread_model
from svdcore.zeroshot import evaluate_zeroshot

CPU = torch.device("cpu")


def room_for_one_layer(model) -> dict[str, str]:
    """A CPU budget that holds what lies outside the layers and about one layer: the rest goes to disk."""
    layer = sum(p.numel() * p.element_size() for p in decoder_layers(model)[0].parameters())
    outside = sum(p.numel() * p.element_size() for p in model.parameters()) - \
        layer * len(decoder_layers(model))
    return {"cpu": f"{(outside + 1.5 * layer) / 1000:.0f}KB"}


@pytest.fixture(scope="module")
def compressed_dir(tiny_model_dir, tmp_path_factory):
    model = load_model(str(tiny_model_dir), torch.float32)
    windows = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    compress_model(model, uniform_ranks(linear_shapes(model), 0.3), "svd-llm", None, CPU, windows)
    path = tmp_path_factory.mktemp("compressed")
    save_compressed(model, tiny_tokenizer(), path)
    return path


@pytest.mark.parametrize("which", ["dense", "compressed"])
def test_a_spread_model_scores_and_writes_as_the_whole_one(which, tiny_model_dir, compressed_dir):
    tokenizer = tiny_tokenizer()
    path = str(tiny_model_dir) if which == "dense" else str(compressed_dir)
    whole = load_model(path, torch.float32) if which == "dense" else load_compressed(path, torch.float32)
    prompts = ["The history of", "In 1998 the"]
    scores, _ = evaluate_zeroshot(whole, tokenizer, ["piqa", "winogrande"], 4, 4, CPU)
    with spread_model(path, torch.float32, room_for_one_layer(whole), CPU, compressed=which == "compressed") as spread:
        placed = set(spread.hf_device_map.values())
        assert placed == {"cpu", "disk"}, spread.hf_device_map  # some layers offloaded, as a big model's would be
        spread_scores, _ = evaluate_zeroshot(spread, tokenizer, ["piqa", "winogrande"], 4, 4, CPU)
        assert spread_scores["tasks"] == scores["tasks"]
        assert generate_samples(spread, tokenizer, prompts, 8, CPU) == generate_samples(whole, tokenizer, prompts, 8, CPU)
        ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(spread(ids).logits, whole(ids).logits)


def test_measure_scores_and_writes_with_the_spread_copy_only_when_asked(tiny_model_dir):
    tokenizer = tiny_tokenizer()
    model = load_model(str(tiny_model_dir), torch.float32)
    calls = {"model": 0, "spread": 0}
    model.register_forward_hook(lambda *_: calls.__setitem__("model", calls["model"] + 1))

    @contextlib.contextmanager
    def spread():
        with spread_model(str(tiny_model_dir), torch.float32, room_for_one_layer(model), CPU) as copy:
            copy.register_forward_hook(lambda *_: calls.__setitem__("spread", calls["spread"] + 1))
            yield copy

    base = with_value("zeroshot.tasks", ["piqa"])
    base.update(device="cpu")
    base["zeroshot"]["limit"] = 3
    base["generate"].update(prompts=["Once upon"], max_new_tokens=4)
    results, counts = [], []
    for device_map in ("none", "auto"):
        base["evaluate"]["device_map"] = device_map
        results.append(measure(model, tokenizer, params_module.validate(base), CPU, "tiny",
                               what=("zeroshot", "samples"), spread=spread)[0])
        counts.append(dict(calls))
    assert counts[0]["model"] > 0 and counts[0]["spread"] == 0  # none: the model as given
    assert counts[1]["model"] == counts[0]["model"] and counts[1]["spread"] > 0  # auto: the spread copy alone
    assert results[0] == results[1]
    base["zeroshot"]["tasks"], base["generate"]["prompts"] = [], []
    measure(model, tokenizer, params_module.validate(base), CPU, "tiny", what=("zeroshot", "samples"), spread=spread)
    assert calls == counts[1]  # nothing to score whole: no spread copy loaded, nothing run


def test_max_memory_caps_the_devices_it_names_and_leaves_the_others_their_free_memory():
    free = {0: 80 * 2**30, 1: 80 * 2**30, "cpu": 100 * 2**30}
    assert accelerate_memory({}, torch.device("cuda"), free) == free
    assert accelerate_memory({"cuda:1": "70GiB"}, torch.device("cuda"), free) == {**free, 1: "70GiB"}
    assert accelerate_memory({"cpu": "8GiB"}, torch.device("cuda:0"), free) == {**free, "cpu": "8GiB"}
    assert accelerate_memory({}, CPU, free) == {"cpu": 100 * 2**30}  # device cpu: no GPU
    assert set(accelerate_memory({}, CPU)) == {"cpu"}  # measured here
    assert DEFAULTS["evaluate"]["device_map"] == "none"
