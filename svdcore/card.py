"""The model card saved in a compressed model's directory (README.md, the Hugging Face format): a
YAML header the hub reads (base model, library, tags), then what was done to the model, how to use
it, and the commit and params that reproduce it."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # pydantic only where params.yaml is read: this module runs without it
    from .params import Params

# the hub id of each packaged model (svdcore.model.PACKAGED_MODELS)
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# what a run's params say about the model (the rest are evaluation settings)
REPRODUCING = ("model", "calibration", "covariances", "compress", "sensitivity")


def hub_id(name: str) -> str | None:
    """The hub id of model.name when it has one: a packaged model's, or the name itself if it has the
    shape of one (owner/name, not a path)."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    parts = name.split("/")
    local = name.endswith(".gguf") or name.startswith((".", "/")) or Path(name).exists()
    return name if len(parts) == 2 and all(parts) and not local else None


def rank_summary(ranks: dict, shapes: dict) -> list[dict]:
    """Per kind of linear (the last part of its name: q_proj, down_proj, ...): how many, how many
    kept dense, and the min / median / max rank against the full rank."""
    kinds = {}
    for name, rank in ranks.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((rank, min(shapes[name])))
    rows = []
    for kind, entries in kinds.items():
        kept = [r for r, _ in entries if r is not None]
        rows.append({"linear": kind, "count": len(entries), "dense": len(entries) - len(kept),
                     "full_rank": max(f for _, f in entries),
                     "rank": (min(kept), statistics.median(kept), max(kept)) if kept else None})
    return rows


def model_card(params: Params, recipe: dict, allocation: dict, save_dtype: str, git_sha: str) -> str:
    """The card's text. `recipe`: Recipe.describe(); `allocation`: artifacts/ranks.json."""
    compress, calibration = params.compress, params.calibration
    base = hub_id(params.model.name)
    header = {**({"base_model": base} if base else {}), "library_name": "transformers",
              "pipeline_tag": "text-generation", "tags": ["svdcore", "low-rank", "svd", compress.method]}
    rows = "\n".join(
        f"| `{r['linear']}` | {r['count']} | {r['full_rank']} | "
        + (f"{r['rank'][0]} / {r['rank'][1]:g} / {r['rank'][2]}" if r["rank"] else "-") + f" | {r['dense']} |"
        for r in rank_summary(allocation["ranks"], allocation["shapes"]))
    knobs = ", ".join(f"{k} {v}" for k, v in recipe.items() if v is not None and v is not False)
    reproduce = yaml.safe_dump({k: getattr(params, k).model_dump() for k in REPRODUCING}, sort_keys=False).rstrip()
    return f"""---
{yaml.safe_dump(header, sort_keys=False).rstrip()}
---

# {base or params.model.name}, compressed by svdcore ({compress.method}, ratio {compress.ratio})

Every decoder linear that svdcore compressed is a `LowRankLinear`: two plain `nn.Linear` modules,
`reduce` (in -> rank) then `expand` (rank -> out, with the bias). Everything else (embeddings,
head, norms, attention code) is the original model's.

| | |
| --- | --- |
| method | `{compress.method}` ({knobs}) |
| target ratio | {compress.ratio} of the decoder-linear parameters removed |
| achieved | {allocation['linear_ratio']:.4f} removed ({allocation['linear_params_compressed']:,} of {allocation['linear_params_dense']:,} decoder-linear parameters kept) |
| allocation | {allocation['strategy']}, ranks a multiple of {allocation['rank_multiple']} |
| calibration | {calibration.samples} windows of {calibration.seqlen} tokens of `{calibration.dataset}` ({calibration.sampler} sampler, seed {calibration.seed}) |
| stored as | {save_dtype} |

Ranks per kind of linear (min / median / max over the layers; "dense" counts the ones left whole):

| linear | count | full rank | rank | dense |
| --- | --- | --- | --- | --- |
{rows}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  # modeling_svdcore.py, beside this card
tokenizer = AutoTokenizer.from_pretrained(PATH)
```

LoRA with PEFT targets the factors, e.g.
`LoraConfig(target_modules=r".*\\.(q_proj|v_proj|down_proj)\\.(reduce|expand)")`; torchao's
`quantize_(model, Int8WeightOnlyConfig())` quantizes every factor.

## Metrics and reproduction

Perplexity, zero-shot accuracy and generation samples of this model are in `metrics/evaluate.json`
of the run that made it (`dvc metrics show`), and in its MLflow run, tagged `model_md5` with this
directory's DVC hash (`dvc.lock`, stage truncate-and-update). Made at commit `{git_sha}` with these
params (`dvc exp run` with them, or `make repro` with them in params.yaml):

```yaml
{reproduce}
```
"""
