"""Random-weight Llama models of real shapes, built in-process (no download).

The cost of compressing or running a model does not depend on its weights' values, so a
random 7B-shaped model measures what a real 7B costs. Weights are drawn on the GPU when there
is one (seconds for billions of values) and kept where the caller asks: CPU memory for the
streamed compression, the device for inference.
"""
import torch

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "70b-layer": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=1, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
}


def random_llama(shape: str, dtype: torch.dtype, device: str | torch.device = "cpu", seed: int = 0):
    """A LlamaForCausalLM of `shape` in eval mode, weights N(0, 0.02), norms 1, on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise SystemExit(f"--shape: expected one of {', '.join(SHAPES)}, got {shape!r}")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    draw_on = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(draw_on).manual_seed(seed)
    with torch.no_grad():
        for p in dict.fromkeys(model.parameters()):  # tied embeddings once
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=dtype, device=draw_on).normal_(0, 0.02, generator=gen))
    # to_empty left the rotary tables uninitialized: build them again
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.eval()
    return model


def random_windows(vocab: int, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(seed))
