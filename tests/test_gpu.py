"""What only a GPU can show: the same artifacts as on the CPU, and the GPU-only code paths
(bf16 Grams on the tensor cores, activations parked in pinned memory). Skipped without CUDA:
CI has none; run on a GPU machine with `python -m pytest tests/test_gpu.py`."""
import pytest
import torch

from conftest import tiny_llama
from svdcore.compress import collect_grams, compress_model
from svdcore.covariances import linear_shapes
from svdcore.gram import batch_gram
from svdcore.lowrank import LowRankLinear
from svdcore.ranks import uniform_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def relative(a, b):
    return float(torch.linalg.norm(a.double().cpu() - b.double().cpu()) / torch.linalg.norm(b.double().cpu()))


def grams(model, windows, device, offload=False):
    out = {}
    collect_grams(model, windows, 3, device, lambda i, s: out.update({(i, g): v.cpu() for g, v in s.grams.items()}),
                  offload=offload)
    return out


WINDOWS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))


def test_bf16_grams_on_the_tensor_cores_have_the_error_of_fp32_accumulation():
    x = torch.randn(8192, 1024, device=GPU).to(torch.bfloat16)
    exact = x.double().T @ x.double()  # bf16 products are exact: only the summation errs
    fast, widened = batch_gram(x), x.float().T @ x.float()
    assert fast.dtype == torch.float32
    # measured on an H100: 2.6e-5 against 3.7e-6 for widened fp32 inputs; both far below the 0.4%
    # that rounding the activations to bf16 costs (test_model.py)
    assert relative(fast, exact) < 1e-4 and relative(widened, exact) < 1e-5


def test_statistics_made_on_the_gpu_match_the_cpu_ones():
    on_cpu, on_gpu = grams(tiny_llama(), WINDOWS, CPU), grams(tiny_llama(), WINDOWS, GPU)
    assert on_cpu.keys() == on_gpu.keys()
    assert max(relative(on_gpu[k], on_cpu[k]) for k in on_cpu) < 1e-5  # fp32 model: summation order only
    parked = grams(tiny_llama(), WINDOWS, GPU, offload=True)
    assert max(relative(parked[k], on_gpu[k]) for k in on_gpu) == 0  # same kernels, activations parked


def test_compressed_models_made_on_the_gpu_match_the_cpu_ones(tmp_path):
    ranks = uniform_ranks(linear_shapes(tiny_llama()), 0.3)
    models = {}
    for device in (CPU, GPU):
        models[device.type] = tiny_llama()
        compress_model(models[device.type], ranks, "svd-llm", None, device, WINDOWS, batch_size=3)
    for name, low in models["cpu"].named_modules():
        if isinstance(low, LowRankLinear):
            other = models["cuda"].get_submodule(name)
            assert other.A.device == CPU  # factors come home with their layer
            assert relative(other.A @ other.B, low.A @ low.B) < 1e-4
    logits = {k: m.to(GPU)(WINDOWS.to(GPU)).logits for k, m in models.items()}
    assert relative(logits["cuda"], logits["cpu"]) < 1e-4


def test_bench_scripts_run_on_the_gpu(tmp_path):
    from bench import compress, infer

    result = compress.main(["--shape", "tiny", "--device", "cuda", "--samples", "8", "--seqlen", "64",
                            "--mode", "fused", "--offload"])
    assert result["dtype"] == "bfloat16" and result["peak_device_gib"] > 0
    rows = infer.main(["--shape", "tiny", "--device", "cuda", "--prefill-batch", "2", "--prefill-len", "64",
                       "--prompt", "16", "--steps", "8", "--repeats", "2"])["rows"]
    assert len(rows) == 5 and all(r["prefill_tok_s"] > 0 for r in rows)


def test_fisher_scales_and_spectra_made_on_the_gpu_match_the_cpu_ones(tmp_path):
    from svdcore.covariances import save_layer
    from svdcore.fisher import fisher_scales
    from svdcore.spectra import whitened_spectra

    on_cpu, on_gpu = fisher_scales(tiny_llama(), WINDOWS, 4, CPU), fisher_scales(tiny_llama(), WINDOWS, 4, GPU)
    assert max(relative(on_gpu[k], on_cpu[k]) for k in on_cpu) < 1e-4  # fp32 backward, another summation order
    collect_grams(tiny_llama(), WINDOWS, 4, CPU, lambda i, s: save_layer(tmp_path, i, s))
    cpu_spectra, gpu_spectra = whitened_spectra(tiny_llama(), tmp_path, CPU), whitened_spectra(tiny_llama(), tmp_path, GPU)
    assert max(relative(gpu_spectra[k], cpu_spectra[k]) for k in cpu_spectra) < 1e-9  # both float64
