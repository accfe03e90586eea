"""A few greedy continuations of fixed prompts: how a model speaks, beside its scores."""
import torch

from .errors import UserError
from .spread import input_device, is_spread


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> list[dict]:
    """One {prompt, completion} per prompt: greedy (so the same model always writes the same
    text), at most `max_new_tokens`, stopping early at the end-of-sequence token."""
    from transformers import GenerationConfig

    if not prompts:  # nothing to write: the model stays where it is
        return []
    if not is_spread(model):
        model.to(device)
    device = input_device(model, device)
    eos = tokenizer.eos_token_id
    # A fresh config: the model's own may ask for sampling (temperature, top_p), which greedy ignores.
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        completion = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": completion})
    return samples


def check_same_prompts(dense: dict, prompts: list[str], max_new_tokens: int, source: str) -> None:
    """Dense samples are shown beside the compressed ones only if they answer the same prompts
    with the same token budget. `source`: the file `dense` was read from."""
    made_from = [s.get("prompt") for s in dense.get("samples", [])]
    if made_from != list(prompts) or dense.get("max_new_tokens") != max_new_tokens:
        raise UserError(f"generate: {source} was made from other prompts or another max_new_tokens than "
                        f"params.yaml's", artifact=source)


def side_by_side(dense: list[dict], compressed: list[dict]) -> list[dict]:
    """{prompt, dense, compressed} per prompt, from two generate_samples results of the same prompts."""
    return [{"prompt": d["prompt"], "dense": d["completion"], "compressed": c["completion"]}
            for d, c in zip(dense, compressed, strict=True)]
