"""The libraries users apply to a compressed model next, each in a process that never imports
svdcore (the model loads through its own modeling file): PEFT's LoRA, torchao's int8, the
text-generation pipeline, and lm-eval's own command line. The commands are the README's
("Using the compressed model")."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_llama, tiny_tokenizer, without_svdcore
from svdcore.lowrank import replace_linear, save_compressed
from svdcore.model import named_linears, weight_matrix

pytest.importorskip("peft")
pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    """A tiny Llama with every decoder linear replaced by its rank-(min/4) truncated SVD, saved."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    for name, linear in named_linears(model).items():
        w = weight_matrix(linear).detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        rank = min(w.shape) // 4
        replace_linear(model, name, (u[:, :rank] * s[:rank]).float(), vh[:rank].float())
    path = tmp_path_factory.mktemp("compressed")
    save_compressed(model, tokenizer, path)
    return path


def test_peft_lora_wraps_the_factors_and_one_step_moves_only_the_adapters(compressed_dir, tmp_path):
    out = without_svdcore(f"""
import json
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(compressed_dir)!r}, trust_remote_code=True)
model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*\\.(q_proj|v_proj|down_proj)\\.(reduce|expand)"))
before = {{n: p.detach().clone() for n, p in model.named_parameters()}}
trained = [p for p in model.parameters() if p.requires_grad]
ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
model(ids, labels=ids).loss.backward()
torch.optim.AdamW(trained, lr=1e-2).step()
changed = {{n for n, p in model.named_parameters() if not torch.equal(p, before[n])}}
wrapped = {{n.split(".lora_A")[0] for n in before if ".lora_A" in n}}
print("WRAPPED", json.dumps(sorted(wrapped)))
print("CHANGED", json.dumps(sorted(changed)))
""", tmp_path)
    wrapped = json.loads(next(line for line in out.splitlines() if line.startswith("WRAPPED"))[8:])
    changed = json.loads(next(line for line in out.splitlines() if line.startswith("CHANGED"))[8:])
    expected = {f"base_model.model.model.layers.{i}.{block}.{proj}.{factor}" for i in range(2)
                for block, proj in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))
                for factor in ("reduce", "expand")}
    assert set(wrapped) == expected
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    # every adapter's B starts at zero, so its A gets no gradient on the first step: the Bs move
    assert {n.split(".lora_B")[0] for n in changed if ".lora_B." in n} == expected


def test_torchao_int8_quantizes_every_factor_and_the_logits_stay_close(compressed_dir, tmp_path):
    out = without_svdcore(f"""
import torch
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from torchao.utils import TorchAOBaseTensor
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(compressed_dir)!r}, trust_remote_code=True).eval()
ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    reference = model(ids).logits
    quantize_(model, Int8WeightOnlyConfig())
    logits = model(ids).logits
factors = [m for n, m in model.named_modules() if n.endswith((".reduce", ".expand"))]
print("FACTORS", len(factors), sum(isinstance(m.weight, TorchAOBaseTensor) for m in factors))
print("FINITE", bool(torch.isfinite(logits).all()))
print("ERROR", float((logits - reference).norm() / reference.norm()))
""", tmp_path)
    figures = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in
               (["FACTORS"], ["FINITE"], ["ERROR"])}
    assert figures["FACTORS"] == ["28", "28"]  # 2 layers x 7 linears x 2 factors
    assert figures["FINITE"] == ["True"] and float(figures["ERROR"][0]) < 0.02


def test_text_generation_pipeline_runs_without_the_unsupported_model_warning(compressed_dir, tmp_path):
    out = without_svdcore(f"""
from transformers import pipeline
generate = pipeline("text-generation", model={str(compressed_dir)!r}, trust_remote_code=True)
print("TEXT", repr(generate("The", max_new_tokens=4, do_sample=False)[0]["generated_text"]))
""", tmp_path)
    assert "TEXT 'The" in out
    assert "is not supported for text-generation" not in out


def test_lm_eval_command_line_scores_a_shipped_task_offline(compressed_dir, tmp_path):
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    assert lm_eval, "lm_eval is installed with the project"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([lm_eval, "--model", "hf", "--model_args",
                           f"pretrained={compressed_dir},trust_remote_code=True,dtype=float32",
                           "--include_path", str(ROOT / "svdcore/zeroshot_tasks"), "--tasks", "piqa", "--limit", "4",
                           "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, env=env)  # the tasks read data/zeroshot/
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())
    piqa = result["results"]["piqa"]
    assert 0 <= piqa["acc,none"] <= 1 and result["n-samples"]["piqa"]["effective"] == 4
