"""Tiny models built in-process: no hub, no downloads, seconds to run."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist each worker, and every stage or dvc process it starts, gets its share of the
# cores: torch's default (a thread per core in every process) oversubscribes them, which made the
# linear algebra of two workers about 1.5x slower than this. Set before torch is first imported.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, str(_share))

import torch  # noqa: E402
import yaml  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch first

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages, wherever pytest runs

from stages.pipeline import ROOT  # noqa: E402

# The long tests in three lanes of about equal time, each an xdist_group: under `make test` (-n 3
# --dist loadgroup) each worker takes a lane, and the short tests go one by one to whichever worker
# is free, so the suite does not end with one long test running alone (2026-12-04: the lanes ended
# within 5 s of each other). Seconds per entry as `make test` ran them then, 3 workers on 2 cores.
# Only the first lane starts with a test that needs the shared `reproduced` repository (its build
# included); the others start with tests that do not, so no worker waits on the build. A stale
# table costs time, never a result. (pytest 9.2 breaks xdist's groups: constraints.txt pins 9.1.)
LANES = (
    ("test_sweep.py",  # 259 (with the build of `reproduced`)
     "test_pipeline.py::test_anchored_refined_method",  # 32
     "test_pipeline.py::test_zeroshot_limit",  # 28
     "test_pipeline.py::test_repro_ratio_change"),  # 37
    ("test_smollm2.py",  # 117
     "test_queue.py",  # 94
     "test_crash_and_determinism.py",  # 67
     "test_clients.py::test_lm_eval"),  # 21
    ("test_distributed.py",  # 80
     "test_bench.py",  # 82
     "test_readme.py",  # 71
     "test_architectures.py",  # 45
     "test_pipeline.py::test_sensitivity"),  # 49
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    def place(item):
        name = f"{item.path.name}::{item.name}"  # wherever pytest was started from
        for lane, entries in enumerate(LANES):
            for rank, entry in enumerate(entries):
                if name.startswith(entry):
                    return lane, rank
        return len(LANES), 0

    for item in items:
        lane, _ = place(item)
        if lane < len(LANES):
            item.add_marker(pytest.mark.xdist_group(f"lane{lane}"))
    items.sort(key=place)  # stable: the lanes first, in order; the short tests keep theirs


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained on a slice of the shipped WikiText valid split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (ROOT / "data/wikitext-2/valid.txt").read_text()[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(vocab_size: int = 320, seed: int = 0):
    """A 2-layer Llama with grouped-query attention (4 heads, 2 kv heads) and tied embeddings."""
    return tiny_causal_lm("llama", vocab_size, seed)


def tiny_causal_lm(arch: str, vocab_size: int = 320, seed: int = 0):
    """A 2-layer random-weight model of one family, small enough to run the pipeline in seconds.

    Together they cover what differs between families: GQA (llama, mistral, qwen2), q/k/v biases
    (qwen2), linear biases, fc1/fc2 and learned positions (opt), Conv1D weights stored in x out
    and a fused q/k/v matrix (gpt2), tied (llama, qwen2, opt, gpt2) and untied (mistral) heads.
    """
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                  bos_token_id=0, eos_token_id=0)
    gqa = dict(hidden_size=64, intermediate_size=96, num_key_value_heads=2)
    configs = {
        "llama": lambda: tf.LlamaConfig(**common, **gqa, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**common, **gqa, sliding_window=16, tie_word_embeddings=False),
        "qwen2": lambda: tf.Qwen2Config(**common, **gqa, tie_word_embeddings=True),
        "opt": lambda: tf.OPTConfig(**common, hidden_size=64, ffn_dim=96, word_embed_proj_dim=64),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=64, n_positions=128,
                                      bos_token_id=0, eos_token_id=0),
    }
    config = configs[arch]()
    return tf.AutoModelForCausalLM.from_config(config).eval()


ARCHITECTURES = ("llama", "mistral", "qwen2", "opt", "gpt2")


def shared_dir(tmp_path_factory) -> Path | None:
    """Under pytest-xdist, the folder every worker of this run shares (the run's own base
    temporary folder, one level above each worker's); None in a run without workers."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    return tmp_path_factory.getbasetemp().parent


@pytest.fixture(scope="session", autouse=True)
def gguf_cache_dir(tmp_path_factory):
    """The suite converts the GGUF into its own cache, never the user's (~/.cache/svdcore); the
    workers of one run share it, so the conversion happens once a run."""
    shared = shared_dir(tmp_path_factory)
    path = shared / "svdcore-cache" if shared else tmp_path_factory.mktemp("svdcore-cache")
    path.mkdir(exist_ok=True)
    previous = os.environ.get("SVDCORE_CACHE")
    os.environ["SVDCORE_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SVDCORE_CACHE", None)
    else:
        os.environ["SVDCORE_CACHE"] = previous


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills once a run: under pytest-xdist, in the folder the workers
    share, by the first worker that needs it while the others wait on a lock."""
    shared = shared_dir(tmp_path_factory)
    if shared is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed building left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with its tokenizer, usable as model.name. Under pytest-xdist the workers
    share one folder: the path is written into the model cards of the repositories they compare."""
    return built_once(tmp_path_factory, "tiny-llama", save_tiny_llama)


def save_tiny_llama(path: Path) -> Path:
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sh(args, cwd, env):
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def set_params(work, **changes):
    """Edit params.yaml in `work`: set_params(work, compress__ratio=0.4, device="cpu")."""
    from stages.project import set_params as set_dotted

    set_dotted(work, {path.replace("__", "."): value for path, value in changes.items()})


def dvc_repo(work: Path, model_dir) -> tuple[Path, dict, list[str]]:
    """A fresh git + DVC repository holding the project, set up for a tiny model.
    Returns (directory, environment for subprocesses, the dvc command)."""
    from stages.project import scratch_project

    env, dvc = scratch_project(work)
    # zero-shot on one task: the scorer has tests of its own for all seven (test_zeroshot.py)
    set_params(work, device="cpu", model__name=str(model_dir), calibration__samples=6,
               calibration__seqlen=32, covariances__batch_size=2, evaluate__seqlen=32,
               evaluate__max_windows=3, zeroshot__tasks=["piqa"], zeroshot__limit=2, generate__max_new_tokens=6,
               compress__ratio=0.2, compress__rank_multiple=1)  # 64-wide matrices: a step of 8 would overshoot
    return work, env, dvc


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """A dvc_repo after one full `dvc repro`, and the log of that run. The tests that need a
    pipeline that has run start from a copy of it (copy_repo) rather than reproduce it again.
    Under pytest-xdist the workers share one: the first to need it builds it, the others wait."""
    def build(folder):
        work, env, dvc = dvc_repo(folder / "repo", tiny_model_dir)
        (folder / "repro.log").write_text(sh(dvc + ["repro"], work, env))

    folder = built_once(tmp_path_factory, "reproduced", build)
    return folder / "repo", (folder / "repro.log").read_text()


def copy_repo(reproduced, dest: Path) -> tuple[Path, dict, list[str]]:
    """A copy of the `reproduced` repository (git, DVC cache and outputs), with an empty MLflow
    store: the copied store's experiment would keep logging into the original's artifact folder.
    Returns (directory, environment for subprocesses, the dvc command), as dvc_repo does."""

    from stages.project import project_env

    shutil.copytree(reproduced[0], dest, symlinks=True)
    (dest / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(dest / "mlartifacts", ignore_errors=True)
    return (dest, *project_env())


def without_svdcore(code: str, scratch: Path) -> str:
    """Run Python `code` in a new process (cwd `scratch`, no PYTHONPATH) and fail if it imported
    svdcore: what a user without svdcore gets. Returns its stdout and stderr together."""
    check = "\nassert not any(k.startswith('svdcore') for k in sys.modules), 'svdcore was imported'\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", "import sys\n" + code + check], cwd=scratch, capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def logits_in_fresh_process(model_dirs: list, ids: torch.Tensor, scratch: Path) -> list[torch.Tensor]:
    """Logits of `ids` from each of `model_dirs`, loaded with trust_remote_code in one new Python
    process that never imports svdcore (one process: its imports cost more than the models)."""
    torch.save(ids, scratch / "ids.pt")
    without_svdcore(
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ids = torch.load({str(scratch / 'ids.pt')!r})\n"
        f"for i, path in enumerate({[str(d) for d in model_dirs]!r}):\n"
        "    m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()\n"
        f"    torch.save(m(ids).logits.detach(), {str(scratch)!r} + f'/logits-{{i}}.pt')\n",
        scratch)
    return [torch.load(scratch / f"logits-{i}.pt") for i in range(len(model_dirs))]


# ---- shared by several test files (tests do not import each other) ----

# params.yaml as shipped, and one value of it changed
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(path, value):
    params = copy.deepcopy(DEFAULTS)
    *parents, leaf = path.split(".")
    node = params
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return params


# random linear-algebra problems: a weight and correlated activations with outlier channels
SHAPES = [(24, 40), (40, 24), (32, 32)]  # m < n, m > n, square


def random_problem(m, n, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=gen, dtype=torch.float64)
    # correlated activations with outlier channels, like a real LLM's
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64) * torch.logspace(0, 2, n, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ mix
    return weight, x


def output_error(weight, a, b, x):
    return torch.linalg.matrix_norm((weight - a @ b) @ x.T) ** 2


def stats_dir(model, windows, tmp_path):
    """The dense statistics of `model` on `windows`, on disk as compute-covariances writes them."""
    from svdcore.compress import collect_grams
    from svdcore.covariances import save_layer

    path = tmp_path / "stats"
    path.mkdir(exist_ok=True)
    collect_grams(model, windows, 4, torch.device("cpu"), lambda i, st: save_layer(path, i, st))
    return path
