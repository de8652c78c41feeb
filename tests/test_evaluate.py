"""composer_sheared.eval.harness through lm-evaluation-harness on tiny models and the local next-line task,
and the Composer evaluator of the same task (same accuracy as lm-eval)."""
import json
import math
import random

import pytest
import torch

from composer_sheared.cli import evaluate as ev_cli
from composer_sheared.eval import harness as ev
from data_prep import next_line_task as nlt

DOMAINS, DOCS_PER_DOMAIN, TOKENS_PER_DOC = ("alpha", "beta"), 25, 4
N_DOCS = len(DOMAINS) * DOCS_PER_DOMAIN
ITEMS = 200


def word(g, j):
    return f"d{g}x{j}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus where every document writes with its own 4 words, a word-level tokenizer, the task,
    a model rigged to know that, and a random-init one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("eval")
    rnd = random.Random(0)
    documents = {}
    for di, dom in enumerate(DOMAINS):
        docs = []
        for k in range(DOCS_PER_DOMAIN):
            g = di * DOCS_PER_DOMAIN + k
            lines = [" ".join(word(g, rnd.randrange(TOKENS_PER_DOC)) for _ in range(6)) for _ in range(12)]
            docs.append(nlt.Doc(f"{dom}-{k}", "\n".join(lines)))
        documents[dom] = docs
    task_dir = root / "task"
    nlt.build_next_line_task(str(task_dir), documents, items=ITEMS, seed=0)

    vocab = {"<unk>": 0, "<eos>": 1}
    for g in range(N_DOCS):
        for j in range(TOKENS_PER_DOC):
            vocab[word(g, j)] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")

    hidden = 64
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(cfg)
    # Rigged: the residual stream carries the current word's document (one-hot) unchanged
    # (attention and MLP outputs zeroed) and the head gives every word of that document a logit of
    # 20: a bigram model that knows which words go together, so the true next line always wins.
    rigged = LlamaForCausalLM(cfg)
    onehot = torch.zeros(len(vocab), hidden)
    for w, i in vocab.items():
        if w.startswith("d"):
            onehot[i, int(w[1:].split("x")[0])] = 1.0
    with torch.no_grad():
        rigged.model.embed_tokens.weight.copy_(onehot)
        rigged.lm_head.weight.copy_(onehot * 20.0 / math.sqrt(hidden))  # RMSNorm scales to sqrt(hidden)
        rigged.model.norm.weight.fill_(1.0)
        for layer in rigged.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    dirs = {}
    for name, m in (("rigged", rigged), ("random", random_model)):
        dirs[name] = root / name
        m.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return {"root": root, "task": task_dir, "dirs": dirs, "tok": tok, "models": {"rigged": rigged,
                                                                                "random": random_model}}


@pytest.fixture(scope="module")
def cli_run(setup):
    """The CLI on both models and both domain tasks: (exit code, stdout, output dir)."""
    import contextlib
    import io

    out = setup["root"] / "out"
    d = setup["dirs"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = ev_cli.main([f"rigged={d['rigged']}", str(d["random"]), "--tasks", "next_line_alpha,next_line_beta",
                      "--include-path", str(setup["task"]), "--out", str(out), "--device", "cpu",
                      "--batch-size", "32"])
    return rc, buf.getvalue(), out


def test_cli_end_to_end_through_lm_eval(cli_run):
    rc, printed, out = cli_run
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert list(res["scores"]) == ["rigged", "random"]  # a plain path is named by its directory
    assert res["scores"]["rigged"] == {"next_line_alpha": 1.0, "next_line_beta": 1.0}
    assert res["samples"] == {"next_line_alpha": ITEMS // 2, "next_line_beta": ITEMS // 2}
    # chance is 1/4; 200 items give a standard error of 0.031
    assert abs(res["average"]["random"] - 0.25) < 0.12, res["average"]
    assert [t["metric"] for t in res["tasks"]] == ["acc,none", "acc,none"]
    table = (out / "eval.md").read_text()
    for text in (table, printed):
        rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
        assert "next_line_alpha" in rows[0] and "next_line_beta" in rows[0] and "average" in rows[0]
        assert rows[2].startswith("| rigged | 100.0 | 100.0 | 100.0 |")
        assert rows[3].startswith("| random | ")


def test_downstream_accuracy_on_the_group(setup):
    acc = ev.downstream_accuracy({"rigged": setup["dirs"]["rigged"]}, setup["task"])
    assert acc == {"rigged": 1.0}


def test_composer_evaluator_matches_lm_eval(setup, cli_run):
    from composer import Trainer
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel

    from composer_sheared.eval.next_line import NextLineAccuracy, build_next_line_evaluator

    lm_eval_acc = json.loads((cli_run[2] / "eval.json").read_text())["scores"]["random"]
    for name, hf in setup["models"].items():
        model = HuggingFaceModel(hf, tokenizer=setup["tok"], use_logits=True, shift_labels=True,
                                 eval_metrics=[LanguageCrossEntropy(), NextLineAccuracy()])
        evals = [build_next_line_evaluator(str(setup["task"]), setup["tok"], batch_size=7, label=t, tasks=[t])
                 for t in ("next_line_alpha", "next_line_beta")]
        trainer = Trainer(model=model, eval_dataloader=evals, device="cpu", progress_bar=False,
                          log_to_console=False)
        trainer.eval()
        got = {t: float(trainer.state.eval_metrics[t]["NextLineAccuracy"].compute()) for t in lm_eval_acc}
        if name == "rigged":
            assert got == {"next_line_alpha": 1.0, "next_line_beta": 1.0}
        else:  # same scoring and tokenization as lm-eval's acc
            assert got == pytest.approx(lm_eval_acc, abs=1e-6)  # fp32 ratio


def test_presets_and_errors(setup):
    specs = ev.resolve_tasks(["sheared-llama"])
    shots = {s.name: s.shots for s in specs}
    assert len(specs) == 13 and shots["arc_challenge"] == 25 and shots["hellaswag"] == 10
    assert shots["mmlu"] == 5 and shots["boolq"] == 32 and shots["nq_open"] == 32 and shots["gsm8k"] == 8
    assert {s.name: s.metric for s in specs}["logiqa"] == "acc_norm"
    with pytest.raises(ValueError, match=r"given twice"):
        ev.resolve_tasks(["piqa", "sheared-llama"])
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        ev.evaluate_models({"m": setup["dirs"]["rigged"]}, [ev.TaskSpec("no_such_task")],
                           include_path=str(setup["task"]), device="cpu")
    assert ev_cli.main([str(setup["root"]), "--tasks", "piqa"]) == 2  # not a model directory
    with pytest.raises(KeyError, match="lm-eval reported no 'acc_norm,none'"):
        ev._pick({"acc,none": 0.5, "acc_stderr,none": 0.1}, ev.TaskSpec("x", 0, "acc_norm"))
