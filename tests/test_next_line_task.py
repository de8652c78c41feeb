"""data_prep/next_line_task.py: deterministic items, held out from the training split, valid lm-eval task."""
import json
import os
import random

import pytest

from data_prep import next_line_task as nlt

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


def make_docs(seed, n_docs, n_lines=10):
    """Documents of unique random lines: a line identifies the document it comes from."""
    rnd = random.Random(seed)
    return ["\n".join(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 9))) for _ in range(n_lines))
            for _ in range(n_docs)]


def write_corpus(root, domains):
    for dom, docs in domains.items():
        os.makedirs(root / dom, exist_ok=True)
        with open(root / dom / f"{dom}.jsonl", "w") as f:
            for t in docs:
                f.write(json.dumps({"text": t}) + "\n")
    return root


def read_items(out):
    items = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl"):
            items += [json.loads(line) for line in open(os.path.join(out, name))]
    return items


def test_items_are_well_formed_and_deterministic(tmp_path):
    src = write_corpus(tmp_path / "held", {"a": make_docs(1, 12), "b": make_docs(2, 12)})
    s1 = nlt.build_from_paths(str(tmp_path / "t1"), [str(src)], items=30, seed=7)
    s2 = nlt.build_from_paths(str(tmp_path / "t2"), [str(src)], items=30, seed=7)
    s3 = nlt.build_from_paths(str(tmp_path / "t3"), [str(src)], items=30, seed=8)
    assert s1["items"] == {"a": 15, "b": 15} and s1["tasks"] == ["next_line_a", "next_line_b"]
    for name in ("next_line_a.jsonl", "next_line_b.jsonl"):
        assert (tmp_path / "t1" / name).read_bytes() == (tmp_path / "t2" / name).read_bytes()
    assert read_items(tmp_path / "t1") != read_items(tmp_path / "t3")

    docs = {d: make_docs(i + 1, 12) for i, d in enumerate("ab")}
    labels = []
    for it in read_items(tmp_path / "t1"):
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        answer = it["choices"][it["label"]]
        labels.append(it["label"])
        # the answer is the line that follows the context in its document ...
        src_doc = next(t for t in docs[it["domain"]] if it["context"] + "\n" + answer in t)
        # ... and every distractor comes from another document of the same domain
        for k, c in enumerate(it["choices"]):
            if k != it["label"]:
                assert c not in src_doc.split("\n")
                assert any(c in t.split("\n") for t in docs[it["domain"]])
    assert len(set(labels)) == 4  # the gold position varies


def test_no_overlap_with_training_split_raw(tmp_path):
    train_docs = make_docs(3, 10)
    held = make_docs(4, 3)
    # held out: a copy of a training document, one that shares a line transition (a -> b) with
    # training, and two clean ones; every candidate position is needed, so leaks cannot hide
    copy = train_docs[0]
    a, b = train_docs[1].split("\n")[2:4]
    lines = held[0].split("\n")
    shared = "\n".join(lines[:5] + [a, b] + lines[5:])
    src = write_corpus(tmp_path / "held", {"x": [copy, shared, held[1], held[2]]})
    train = write_corpus(tmp_path / "train", {"x": train_docs})
    train_text = "\n".join(train_docs)

    def leaks(out):
        return [it for it in read_items(out) if it["context"].rsplit("\n", 1)[-1] + "\n" + it["choices"][it["label"]]
                in train_text]

    # without the exclusion: 9 + 10 + 9 + 9 positions, all taken; the leaks are there
    nlt.build_from_paths(str(tmp_path / "leaky"), [str(src)], items=37, max_items_per_doc=10)
    assert len(leaks(tmp_path / "leaky")) >= 9

    s = nlt.build_from_paths(str(tmp_path / "task"), [str(src)], exclude=[str(train)], items=28,
                             max_items_per_doc=10)
    assert s["excluded_training_docs"] == len(train_docs)
    items = read_items(tmp_path / "task")
    assert len(items) == 28 and not leaks(tmp_path / "task")
    assert not any(it["doc"].endswith(":1") for it in items)  # the copy (first line of the file)
    assert any(it["doc"].endswith(":2") for it in items)  # the shared one, less its leaking item
    with pytest.raises(ValueError, match="only 28 next-line items"):  # the a -> b item was refused
        nlt.build_from_paths(str(tmp_path / "t29"), [str(src)], exclude=[str(train)], items=29,
                             max_items_per_doc=10)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (decodes text exactly, newlines included), trained offline."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(make_docs(0, 50), vocab_size=400, special_tokens=["<eos>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>",
                                  clean_up_tokenization_spaces=False)
    path = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(str(path))
    return str(path)


def test_no_overlap_with_training_split_mds(tmp_path, bpe_tokenizer):
    from data_prep.tokenize_domains import tokenize_domains

    docs = make_docs(5, 40, n_lines=6)
    corpus = write_corpus(tmp_path / "corpus", {"x": docs})
    mds = tmp_path / "mds"
    stats = tokenize_domains(str(corpus), str(mds), bpe_tokenizer, seq_len=64, eval_sequences=6, workers=1,
                             progress=False)
    assert stats["domains"]["x"]["train"]["sequences"] > 0
    held = nlt.read_mds_split(str(mds), bpe_tokenizer, "eval")["x"]
    train = nlt.read_mds_split(str(mds), bpe_tokenizer, "train")["x"]
    # decoded eval documents are whole corpus documents, in order; the one cut by the split is dropped
    assert [d.text for d in held] == docs[:len(held)]
    train_lines = {ln for d in train for ln in d.text.split("\n")}
    assert docs[len(held)].split("\n")[-1] in train_lines  # the cut document goes on in train

    s = nlt.build_from_paths(str(tmp_path / "task"), [str(mds)], exclude=[str(mds)], tokenizer=bpe_tokenizer,
                             items=8, seed=1)
    assert s["items"] == {"x": 8}
    line_doc = {ln: k for k, t in enumerate(docs) for ln in t.split("\n")}
    train_doc_ids = {line_doc[ln] for ln in train_lines if ln in line_doc}
    for it in read_items(tmp_path / "task"):
        used = {line_doc[ln] for ln in it["context"].split("\n") + [it["choices"][it["label"]]]}
        assert len(used) == 1 and not used & train_doc_ids


def test_task_yaml_and_errors(tmp_path):
    src = write_corpus(tmp_path / "held", {"a": make_docs(1, 3, n_lines=3)})
    with pytest.raises(ValueError, match="domain 'a': only .* items"):
        nlt.build_from_paths(str(tmp_path / "t"), [str(src)], items=50)
    assert not (tmp_path / "t").exists()  # nothing half-written
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    (bad / "a.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: expected a JSON object with a 'text'"):
        nlt.read_raw_corpus(str(tmp_path / "bad"))

    nlt.build_from_paths(str(tmp_path / "ok"), [str(src)], items=2)
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tmp_path / "ok"))
    assert "next_line" in tm.all_tasks and "next_line_a" in tm.all_tasks
    task = tm.load_task_or_group(["next_line_a"])["next_line_a"]
    docs = list(task.test_docs())
    assert len(docs) == 2 and task.doc_to_choice(docs[0]) == docs[0]["choices"]
    assert task.doc_to_target(docs[0]) == docs[0]["label"]
    assert task.config.target_delimiter == "\n"
