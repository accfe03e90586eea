"""Perplexity with the decoder layers streamed through the device one at a time (for models bigger
than the device) is the whole-model perplexity, on every family, dense or compressed."""
import pytest
import torch

from conftest import ARCHITECTURES, tiny_causal_lm
from svdcore.compress import compress_model
from svdcore.covariances import linear_shapes
from svdcore.errors import UserError
from svdcore.model import decoder_layers
from svdcore.perplexity import perplexity
from svdcore.ranks import uniform_ranks

CPU = torch.device("cpu")
WINDOWS = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_perplexity_is_the_whole_model_perplexity(arch):
    model = tiny_causal_lm(arch).eval()
    layers = list(decoder_layers(model))
    whole = perplexity(model, WINDOWS, 2, CPU)  # batches of 2, 2 and 1: a ragged last batch too
    streamed = perplexity(model, WINDOWS, 2, CPU, stream_layers=True)
    assert streamed["nll"] == pytest.approx(whole["nll"], rel=1e-6, abs=1e-7)
    assert streamed["tokens"] == whole["tokens"] and streamed["windows"] == whole["windows"]
    assert list(decoder_layers(model)) == layers  # the real layers are back in place
    # compressed (low-rank factors) the same holds
    compress_model(model, uniform_ranks(linear_shapes(model), 0.4), "svd", None, CPU)
    assert perplexity(model, WINDOWS, 2, CPU, stream_layers=True)["nll"] == pytest.approx(
        perplexity(model, WINDOWS, 2, CPU)["nll"], rel=1e-6, abs=1e-7)


def test_a_failed_streamed_pass_puts_the_layers_back():
    model = tiny_causal_lm("llama").eval()
    layers = list(decoder_layers(model))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # the head is shared with the embeddings: every logit NaN
    with pytest.raises(UserError, match="non-finite logits in window 0"):
        perplexity(model, WINDOWS, 2, CPU, stream_layers=True)
    assert list(decoder_layers(model)) == layers
