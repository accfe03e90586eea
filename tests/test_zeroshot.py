"""Zero-shot accuracy through lm-eval on the shipped splits, and the generation samples."""
import gzip
import hashlib
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, tiny_llama, tiny_tokenizer
from svdcore.errors import UserError
from svdcore.generation import check_same_prompts, generate_samples, side_by_side
from svdcore.model import decoder_layers
from svdcore.zeroshot import TASK_DIR, check_same_protocol, evaluate_zeroshot, mean_scores
from svdcore.choices import ZEROSHOT_TASKS as TASKS
from svdcore.zeroshot_data import SPLITS, task_records

CPU = torch.device("cpu")
DATA = ROOT / "data/zeroshot"
SPLIT_SIZES = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
               "openbookqa": 500, "mathqa": 2985}
# Where lm-eval 0.4.13 keeps its own definition of each task.
LM_EVAL_YAML = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml", "mathqa": "mathqa/mathqa.yaml"}
# What may differ: where the data comes from and which splits are named; tags group tasks in lm-eval's index.
DATA_SOURCE_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split",
                    "validation_split", "test_split", "fewshot_split", "tag"}


# ---------------------------------------------------------------- the shipped data

def test_shipped_files_are_the_collected_ones():
    """Every shipped .gz decompresses to the file whose sha256 data/zeroshot/SOURCE.md records."""
    row = re.compile(r"^\| (\S+) \| [^|]+ \| [^|]+ \| ([0-9a-f]{64}) \|", re.M)
    table = dict(row.findall((DATA / "SOURCE.md").read_text()))
    shipped = sorted(DATA.rglob("*.gz"))
    assert len(shipped) == 8
    for path in shipped:
        name = path.relative_to(DATA).as_posix().removesuffix(".gz")
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == table[name], name


@pytest.mark.parametrize("task", TASKS)
def test_records_have_the_split_size_and_the_layout_lm_eval_reads(task):
    records = task_records(task)
    assert len(records) == SPLIT_SIZES[task]
    first = records[0]
    if task.startswith("arc"):
        assert first["choices"]["text"][first["choices"]["label"].index(first["answerKey"])]
    expected_fields = {
        "piqa": {"goal", "sol1", "sol2", "label"}, "hellaswag": {"ctx_a", "ctx_b", "endings", "label"},
        "winogrande": {"sentence", "option1", "option2", "answer"}, "mathqa": {"Problem", "options", "correct"},
        "openbookqa": {"question_stem", "choices", "answerKey"}, "arc_easy": {"question", "choices", "answerKey"},
        "arc_challenge": {"question", "choices", "answerKey"}}
    assert expected_fields[task] <= set(first)


def test_arc_gold_index_survives_the_letter_rebuild():
    raw = [json.loads(line) for line in gzip.open(DATA / "arc_challenge/ARC-Challenge-test.jsonl.gz", "rt")]
    for source, record in zip(raw, task_records("arc_challenge")):
        assert record["choices"]["label"].index(record["answerKey"]) == source["gold"]
        assert record["choices"]["text"] == source["choices"]


# ---------------------------------------------------------------- the task definitions

def _comparable(config: dict) -> dict:
    """A task config with its data source left out and functions compared by their source code."""
    return {key: (inspect.getsource(value) if callable(value) else value)
            for key, value in config.items() if key not in DATA_SOURCE_KEYS}


@pytest.mark.parametrize("task", TASKS)
def test_task_definitions_are_lm_evals_own_but_for_the_data(task):
    """Prompts, targets, choices, preprocessing and metrics equal the installed lm-eval's
    definition of the task, so the numbers mean what the papers' mean."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[task])
    ours = load_yaml(TASK_DIR / f"{task}.yaml")
    assert _comparable(ours) == _comparable(theirs)
    # and we score the split lm-eval scores: its test split where it names one, else validation
    lm_eval_split = theirs.get("test_split") or theirs["validation_split"]
    assert SPLITS[task] == lm_eval_split == (ours.get("test_split") or ours.get("validation_split"))
    assert ours["custom_dataset"].args == (task,)


# ---------------------------------------------------------------- scoring a tiny model

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_scores(tokenizer):
    return evaluate_zeroshot(tiny_llama(len(tokenizer)), tokenizer, list(TASKS), 3, 8, CPU)


def test_tiny_model_is_scored_on_every_task(tiny_scores):
    metrics, runtime = tiny_scores
    assert metrics["limit"] == 3 and metrics["num_fewshot"] == 0
    assert list(metrics["tasks"]) == list(TASKS) and set(runtime["zeroshot_seconds"]) == set(TASKS)
    for task, scores in metrics["tasks"].items():
        assert scores["items"] == 3 and scores["items_in_split"] == SPLIT_SIZES[task]
        assert scores["acc"] in (0, 1 / 3, 2 / 3, 1)
        assert ("acc_norm" in scores) == (task != "winogrande")  # lm-eval scores WinoGrande by acc only
    chance = {task: scores["chance"] for task, scores in metrics["tasks"].items()}
    assert chance["piqa"] == chance["winogrande"] == 0.5 and chance["mathqa"] == 0.2
    assert chance["openbookqa"] == chance["hellaswag"] == 0.25
    assert metrics["mean"]["acc"] == pytest.approx(sum(s["acc"] for s in metrics["tasks"].values()) / 7)


def test_no_tasks_means_no_lm_eval(tokenizer):
    metrics, runtime = evaluate_zeroshot(None, tokenizer, [], 5, 8, CPU)
    assert metrics == {"limit": 5, "num_fewshot": 0, "tasks": {}, "mean": {}}
    assert runtime == {"zeroshot_seconds": {}}


def test_mean_acc_norm_takes_winogrande_acc():
    per_task = {"piqa": {"acc": 0.5, "acc_norm": 0.7, "chance": 0.5}, "winogrande": {"acc": 0.6, "chance": 0.5}}
    assert mean_scores(per_task) == pytest.approx({"acc": 0.55, "acc_norm": 0.65, "chance": 0.5})


# ---------------------------------------------------------------- a model whose answers are certain

FAVOURED = set("xq ")  # the correct choices are written with these characters only


def favouring_model(tokenizer):
    """A tiny Llama rebuilt by hand so that, whatever the context, its next token is one of the
    tokens spelled only with FAVOURED characters (log-probability about -log of their count) and
    any other token is about e^-60 less likely.

    Each decoder layer's output projections are zeroed, so the residual stream is the input
    embedding; embeddings are c_v * (1, ..., 1), so the final RMSNorm maps every position to
    (1, ..., 1) and the tied head gives logit(v) = hidden_size * c_v: 64 for favoured tokens,
    3.2 for the rest.
    """
    model = tiny_llama(len(tokenizer))
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    text = [tokenizer.convert_tokens_to_string([token]) for token in vocab]
    favoured = torch.tensor([bool(t) and set(t) <= FAVOURED for t in text])
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1)
        height = torch.where(favoured, 1.0, 0.05)
        model.get_input_embeddings().weight.copy_(height[:, None].expand(-1, model.config.hidden_size))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def _write(path: Path, lines: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        fh.write("".join(line + "\n" for line in lines))


def certain_data(folder: Path, golds: list[int], label_shift: int = 0) -> Path:
    """Items of five tasks, in the shipped files' layouts, whose choice `golds[i]` (modulo the
    number of choices) is written in FAVOURED characters ("xq xq") and every other choice in
    digits. Each item's label points `label_shift` choices past it: 0 names the right one.
    `golds` varies the position, so a label read off by one scores 0, not 1."""
    def choices(n, gold):
        return ["xq xq" if i == gold % n else f"{i}{i}8 {i}1" for i in range(n)]

    def label(n, gold):
        return (gold + label_shift) % n

    _write(folder / "piqa/valid.jsonl.gz", [json.dumps(dict(zip(("sol1", "sol2"), choices(2, g)), goal=f"Goal {i}"))
                                            for i, g in enumerate(golds)])
    _write(folder / "piqa/valid-labels.lst.gz", [str(label(2, g)) for g in golds])
    _write(folder / "arc_easy/ARC-Easy-test.jsonl.gz",
           [json.dumps({"id": str(i), "question": f"Question {i}?", "choices": choices(4, g), "gold": label(4, g)})
            for i, g in enumerate(golds)])
    _write(folder / "hellaswag/hellaswag_val.jsonl.gz",
           [json.dumps({"activity_label": "Test", "ctx_a": f"Someone does thing {i}.", "ctx_b": "then they",
                        "endings": choices(4, g), "label": label(4, g)}) for i, g in enumerate(golds)])
    letters = ["A", "B", "C", "D"]
    _write(folder / "openbookqa/test.jsonl.gz",
           [json.dumps({"id": str(i), "question_stem": f"Stem {i} is",
                        "choices": {"text": choices(4, g), "label": letters}, "answerKey": letters[label(4, g)]})
            for i, g in enumerate(golds)])
    mathqa = [{"Problem": f"problem {i}", "correct": "abcde"[label(5, g)],
               "options": " , ".join(f"{'abcde'[k]} ) {c}" for k, c in enumerate(choices(5, g)))}
              for i, g in enumerate(golds)]
    _write(folder / "mathqa/test.json.gz", [json.dumps(mathqa)])
    return folder


CERTAIN_TASKS = ["piqa", "arc_easy", "hellaswag", "openbookqa", "mathqa"]
GOLDS = [0, 1, 2, 3, 1, 0]


def test_certain_answers_score_exactly_one_and_misplaced_labels_zero(tmp_path, tokenizer):
    """WinoGrande is left out: its two options differ in the context and share the scored
    continuation, which this context-blind model scores the same."""
    model = favouring_model(tokenizer)
    right, _ = evaluate_zeroshot(model, tokenizer, CERTAIN_TASKS, 0, 4, CPU,
                                 data_dir=certain_data(tmp_path / "right", GOLDS))
    wrong, _ = evaluate_zeroshot(model, tokenizer, CERTAIN_TASKS, 0, 4, CPU,
                                 data_dir=certain_data(tmp_path / "wrong", GOLDS, label_shift=1))
    for task in CERTAIN_TASKS:
        assert right["tasks"][task]["items"] == wrong["tasks"][task]["items"] == len(GOLDS)
        assert (right["tasks"][task]["acc"], right["tasks"][task]["acc_norm"]) == (1.0, 1.0), task
        assert (wrong["tasks"][task]["acc"], wrong["tasks"][task]["acc_norm"]) == (0.0, 0.0), task


def test_limit_takes_the_first_items_and_zero_takes_all(tmp_path, tokenizer, monkeypatch):
    import lm_eval.evaluator
    import torch.utils.collect_env

    model = favouring_model(tokenizer)
    data = certain_data(tmp_path, GOLDS)
    # lm-eval's report of the environment (torch's collect_env: a dozen subprocesses a task) is skipped
    reported = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: reported.append(1) or "")
    add_env_info = lm_eval.evaluator.add_env_info
    limited, _ = evaluate_zeroshot(model, tokenizer, ["piqa"], 2, 4, CPU, data_dir=data)
    assert reported == [] and lm_eval.evaluator.add_env_info is add_env_info  # and put back afterwards
    whole, _ = evaluate_zeroshot(model, tokenizer, ["piqa"], 0, 4, CPU, data_dir=data)
    assert limited["limit"] == 2 and whole["limit"] == 0
    assert (limited["tasks"]["piqa"]["items"], limited["tasks"]["piqa"]["items_in_split"]) == (2, len(GOLDS))
    assert (whole["tasks"]["piqa"]["items"], whole["tasks"]["piqa"]["items_in_split"]) == (len(GOLDS), len(GOLDS))


def test_missing_data_file_is_named(tmp_path, tokenizer):
    with pytest.raises(UserError, match=r"zeroshot: data file .*piqa/valid.jsonl.gz is missing"):
        task_records("piqa", tmp_path)


def test_dense_scores_from_another_protocol_are_refused():
    dense = {"limit": 50, "tasks": {"piqa": {}, "arc_easy": {}}}
    check_same_protocol(dense, ["arc_easy", "piqa"], 50, "d.json")
    with pytest.raises(UserError, match=r"zeroshot: d.json was scored .* limit 50.*limit 100$") as bad:
        check_same_protocol(dense, ["arc_easy", "piqa"], 100, "d.json")
    assert bad.value.artifact == "d.json"  # the stage layer adds which stage rebuilds it
    with pytest.raises(UserError, match=r"on tasks \['arc_easy', 'piqa'\].*asks for \['piqa'\]"):
        check_same_protocol(dense, ["piqa"], 50, "d.json")


# ---------------------------------------------------------------- generation samples

def test_generation_is_greedy_bounded_and_repeatable(tokenizer):
    model = tiny_llama(len(tokenizer))
    prompts = ["The history of", "In 1998 the"]
    first = generate_samples(model, tokenizer, prompts, 12, CPU)
    assert first == generate_samples(model, tokenizer, prompts, 12, CPU)
    assert [s["prompt"] for s in first] == prompts
    for sample in first:
        assert 0 < len(tokenizer(sample["completion"])["input_ids"]) <= 12 + 2  # re-tokenizing may merge differently
    assert generate_samples(model, tokenizer, [], 12, CPU) == []


def test_samples_pair_up_only_for_the_same_prompts():
    dense = {"max_new_tokens": 8, "samples": [{"prompt": "a", "completion": " b"}]}
    check_same_prompts(dense, ["a"], 8, "d.json")
    for prompts, budget in ((["a", "c"], 8), (["a"], 16)):
        with pytest.raises(UserError, match="generate: d.json was made from other prompts") as bad:
            check_same_prompts(dense, prompts, budget, "d.json")
        assert bad.value.artifact == "d.json"
    assert side_by_side(dense["samples"], [{"prompt": "a", "completion": " c"}]) == [
        {"prompt": "a", "dense": " b", "compressed": " c"}]
