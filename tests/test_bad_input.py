"""Bad input of every kind gets one clear error naming what is wrong, and is never used silently:
property tests over params.yaml values, corrupt or mismatched artifacts, non-finite numbers."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import DEFAULTS, tiny_causal_lm, with_value
from svdcore import params as params_module
from svdcore.compress import collect_grams, compress_model
from svdcore.covariances import linear_shapes, save_layer
from svdcore.errors import UserError
from svdcore.evaluation import evaluate_model
from svdcore.lowrank import load_compressed, save_compressed
from svdcore.model import decoder_layers, load_model
from svdcore.ranks import check_ranks, uniform_ranks

CPU = torch.device("cpu")


def leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


LEAVES = sorted(leaves(DEFAULTS))
ANYTHING = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(LEAVES), value=ANYTHING)
def test_any_value_is_accepted_or_rejected_naming_its_key(key, value):
    try:
        params_module.validate(with_value(key, value))
    except UserError as e:
        assert str(e).startswith(f"{key}:") and "\n" not in str(e), str(e)


@settings(max_examples=200, deadline=None)
@given(ratio=st.floats(0, 1, exclude_max=True), samples=st.integers(1, 10**6), seed=st.integers(0, 2**63 - 1),
       method=st.sampled_from(params_module.METHODS))
def test_values_inside_the_ranges_are_accepted(ratio, samples, seed, method):
    params = with_value("compress.ratio", ratio)
    params["compress"]["method"] = method
    params["calibration"].update(samples=samples, seed=seed)
    params_module.validate(params)


@settings(max_examples=200, deadline=None)
@given(ratio=st.floats(allow_nan=True).filter(lambda r: not 0 <= r < 1))
def test_ratios_outside_zero_one_are_rejected(ratio):
    with pytest.raises(UserError, match=r"^compress\.ratio: expected a number in \[0, 1\)"):
        params_module.validate(with_value("compress.ratio", ratio))


@settings(max_examples=100, deadline=None)
@given(key=st.sampled_from(["calibration.samples", "calibration.seqlen", "covariances.batch_size",
                            "evaluate.seqlen", "evaluate.batch_size", "zeroshot.batch_size",
                            "generate.max_new_tokens"]), value=st.integers(-10**6, 0))
def test_counts_below_their_minimum_are_rejected(key, value):
    with pytest.raises(UserError, match=rf"^{key}: expected an integer >= \d+, got {value}$"):
        params_module.validate(with_value(key, value))


@settings(max_examples=100, deadline=None)
@given(section=st.sampled_from([None, *[k for k, v in DEFAULTS.items() if isinstance(v, dict)]]),
       name=st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))
def test_unknown_keys_are_named(section, name):
    params = with_value("device", "cpu")
    node = params if section is None else params[section]
    if name in node:
        return
    node[name] = 1
    key = name if section is None else f"{section}.{name}"
    with pytest.raises(UserError, match=rf"^{key}: unknown key; allowed here: "):
        params_module.validate(params)


# ---- artifacts that are missing, corrupt or made for something else ----

def stats_for(model, directory, windows=None):
    windows = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(0)) if windows is None else windows
    directory.mkdir(exist_ok=True)
    collect_grams(model, windows, 3, CPU, lambda i, st: save_layer(directory, i, st))
    return directory


def test_ranks_file_that_does_not_fit_the_model_is_named():
    shapes = linear_shapes(tiny_causal_lm("llama"))
    ranks = uniform_ranks(shapes, 0.3)
    check_ranks(ranks, shapes, "ranks.json")
    missing = dict(ranks)
    missing.popitem()
    with pytest.raises(UserError, match="ranks.json does not list this model's linears"):
        check_ranks(missing, shapes, "ranks.json")
    name = next(iter(shapes))
    for bad in (0, -3, 2.5, "8", 10**6):
        with pytest.raises(UserError, match=rf"gives {name} .* rank {bad!r}; expected null"):
            check_ranks({**ranks, name: bad}, shapes, "ranks.json")


def test_statistics_of_another_model_are_refused(tmp_path):
    import transformers as tf

    small = tiny_causal_lm("llama")
    stats = stats_for(tiny_causal_lm("gpt2"), tmp_path / "stats")  # other linear names (attn.c_attn, ...)
    with pytest.raises(UserError, match="no Gram for model.layers.0.self_attn.q_proj"):
        compress_model(small, uniform_ranks(linear_shapes(small), 0.3), "svd-llm", stats, CPU)
    # same names, other widths: a Gram of the wrong size is named, not broadcast
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    stats = stats_for(other, tmp_path / "other")
    with pytest.raises(UserError, match=r"the Gram for model.layers.0.self_attn.q_proj is \(32, 32\), but the "
                                        r"matrix has 64 inputs"):
        compress_model(small, uniform_ranks(linear_shapes(small), 0.3), "svd-llm", stats, CPU)


def test_truncated_compressed_model_is_named(tmp_path):
    model = tiny_causal_lm("llama")
    compress_model(model, uniform_ranks(linear_shapes(model), 0.3), "svd", None, CPU)
    save_compressed(model, None, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"compressed model: cannot load {tmp_path / 'm'}"):
        load_compressed(tmp_path / "m")


def test_stage_refuses_ranks_made_for_another_ratio_or_multiple(tmp_path, monkeypatch):
    from stages import truncate_and_update

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts/ranks.json").write_text(json.dumps({"ratio": 0.5, "ranks": {}, "shapes": {}}))
    with pytest.raises(UserError, match=r"allocated for compress.ratio 0.5, params.yaml says 0.2; rerun allocate-ranks"):
        truncate_and_update.work(params_module.validate(DEFAULTS))
    (tmp_path / "artifacts/ranks.json").write_text(json.dumps({"ratio": 0.2, "rank_multiple": 64, "ranks": {}}))
    with pytest.raises(UserError, match=r"allocated for compress.rank_multiple 64, params.yaml says 1; rerun"):
        truncate_and_update.work(params_module.validate(DEFAULTS))


def test_windows_longer_than_the_context_are_refused(tmp_path, monkeypatch, tiny_model_dir):
    from stages import collect_calibration

    monkeypatch.chdir(tmp_path)
    params = with_value("model.name", str(tiny_model_dir))
    params["calibration"]["seqlen"] = 256
    with pytest.raises(UserError, match="calibration.seqlen: 256 tokens per window, but the model's context is 128"):
        collect_calibration.work(params_module.validate(params))
    assert not (tmp_path / "artifacts").exists()
    with pytest.raises(UserError, match="evaluate.seqlen: 200 tokens per window, but the model's context is 128"):
        evaluate_model(tiny_causal_lm("gpt2"), None, ["wikitext2"], 200, 1, 1, CPU, "dense")


def test_calibration_from_another_tokenizer_is_refused(tmp_path, monkeypatch, tiny_model_dir):
    from safetensors.torch import save_file
    from stages import compute_covariances

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts").mkdir()
    save_file({"input_ids": torch.full((2, 16), 40000)}, str(tmp_path / "artifacts/calibration.safetensors"))
    with pytest.raises(UserError, match=r"token id 40000 .* outside the model's vocabulary \(\d+\)"):
        compute_covariances.work(params_module.validate(with_value("model.name", str(tiny_model_dir))))
    assert not (tmp_path / "artifacts/stats").exists()


# ---- non-finite numbers stop the run with the layer and matrix named ----

def test_non_finite_weight_is_named_at_load(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"the weight model.layers.1.mlp.down_proj.weight has non-finite values"):
        load_model(str(tmp_path))


def test_non_finite_activation_names_layer_and_matrix(tmp_path):
    model = tiny_causal_lm("llama")
    with torch.no_grad():
        decoder_layers(model)[1].post_attention_layernorm.weight[0] = float("inf")
    with pytest.raises(UserError, match=r"layer 1, mlp.gate_proj: non-finite input activations"):
        stats_for(model, tmp_path / "s")


def test_overflowing_gram_names_layer_and_matrix(tmp_path):
    model = tiny_causal_lm("llama")
    with torch.no_grad():  # finite activations whose squares overflow float32
        decoder_layers(model)[0].mlp.up_proj.weight.mul_(1e25)
    with pytest.raises(UserError, match=r"layer 0, mlp.down_proj: the Gram matrix has non-finite values"):
        stats_for(model, tmp_path / "s")


def test_non_finite_layer_output_names_the_layer(tmp_path):
    model = tiny_causal_lm("opt")
    layer = decoder_layers(model)[0]
    layer.register_forward_hook(lambda m, args, out: (out[0] * float("nan"), *out[1:])
                                if isinstance(out, tuple) else out * float("nan"))
    with pytest.raises(UserError, match=r"layer 0 \(OPTDecoderLayer\): non-finite output activations"):
        stats_for(model, tmp_path / "s")
