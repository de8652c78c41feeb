"""data_prep: JSONL -> per-domain MDS (atomic, exact cutting, bad lines) and the local corpus."""
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import local_corpus, tokenize_domains as td  # noqa: E402

WORDS = [f"w{i}" for i in range(200)]
SEQ = 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny offline word-level tokenizer saved as a HF tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(str(path))
    return str(path)


def docs_for(seed, n=120):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 30))) for _ in range(n)]


def write_jsonl(path, docs, opener=open, extra=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with opener(path, "wt") as f:
        for i, t in enumerate(docs):
            obj = {"text": t, "meta": {"redpajama_set_name": extra[i % len(extra)]}} if extra else {"text": t}
            f.write(json.dumps(obj) + "\n")


@pytest.fixture()
def corpus(tmp_path):
    """Three domains by directory: plain, gzip and zstd inputs."""
    import zstandard

    def zst_open(path, mode):
        return zstandard.open(path, mode)

    write_jsonl(str(tmp_path / "in" / "alpha" / "part1.jsonl"), docs_for(1))
    write_jsonl(str(tmp_path / "in" / "alpha" / "part2.jsonl"), docs_for(2, 40))
    write_jsonl(str(tmp_path / "in" / "beta" / "x.jsonl.gz"), docs_for(3), opener=gzip.open)
    write_jsonl(str(tmp_path / "in" / "gamma" / "y.jsonl.zst"), docs_for(4), opener=zst_open)
    return tmp_path


def read_split(out, split, domain):
    from streaming.base.format import reader_from_json

    index = json.load(open(os.path.join(out, split, domain, "index.json")))
    seqs = []
    for shard in index["shards"]:
        reader = reader_from_json(os.path.join(out, split, domain), None, shard)
        seqs += [reader[i]["tokens"] for i in range(reader.samples)]
    return seqs


def expected_stream(tokenizer_dir, docs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        out += ids + [tok.eos_token_id]
    return out


def test_domains_by_directory_exact_sequences_and_stats(corpus, tokenizer_dir):
    out = str(corpus / "mds")
    stats = td.tokenize_domains(str(corpus / "in"), out, tokenizer_dir, SEQ, eval_sequences=5, workers=1,
                                progress=False)
    assert sorted(stats["domains"]) == ["alpha", "beta", "gamma"]
    assert stats["dtype"] == "uint16" and stats["vocab_size"] == len(WORDS) + 2
    # alpha = part1 then part2 (sorted files), EOS after every doc, cut into SEQ exactly; eval first
    stream = expected_stream(tokenizer_dir, docs_for(1) + docs_for(2, 40))
    ev, tr = read_split(out, "eval", "alpha"), read_split(out, "train", "alpha")
    assert len(ev) == 5 and all(s.dtype == np.uint16 and s.shape == (SEQ,) for s in ev + tr)
    n = len(stream) // SEQ
    np.testing.assert_array_equal(np.concatenate(ev + tr), stream[:n * SEQ])
    a = stats["domains"]["alpha"]
    assert a["eval"] == {"docs": a["eval"]["docs"], "tokens": 5 * SEQ, "sequences": 5}
    assert a["train"]["sequences"] == n - 5 and a["dropped_tokens"] == len(stream) - n * SEQ
    assert a["input_docs"] == 160 and a["train"]["docs"] + a["eval"]["docs"] <= 160
    # gzip / zstd inputs give the same as plain text would
    for dom, seed in (("beta", 3), ("gamma", 4)):
        s = expected_stream(tokenizer_dir, docs_for(seed))
        got = np.concatenate(read_split(out, "eval", dom) + read_split(out, "train", dom))
        np.testing.assert_array_equal(got, s[:len(got)])
    assert json.load(open(os.path.join(out, "stats.json"))) == stats
    # the result does not depend on the number of processes
    stats2 = td.tokenize_domains(str(corpus / "in"), str(corpus / "mds2"), tokenizer_dir, SEQ, eval_sequences=5,
                                 workers=2, progress=False)
    assert stats2 == stats


def test_domain_from_dotted_key_with_short_names(tmp_path, tokenizer_dir):
    write_jsonl(str(tmp_path / "in" / "mixed.jsonl"), docs_for(7, 200),
                extra=["RedPajamaGithub", "RedPajamaArXiv"])
    stats = td.tokenize_domains(str(tmp_path / "in"), str(tmp_path / "out"), tokenizer_dir, SEQ, 2,
                                domain_key="meta.redpajama_set_name", workers=1, progress=False)
    assert sorted(stats["domains"]) == ["arxiv", "github"]
    assert os.path.isfile(str(tmp_path / "out" / "train" / "github" / "index.json"))


def test_interrupted_run_leaves_nothing_and_rerun_matches_clean_run(corpus, tokenizer_dir, monkeypatch):
    clean = td.tokenize_domains(str(corpus / "in"), str(corpus / "clean"), tokenizer_dir, SEQ, 5, workers=1,
                                progress=False)
    out = corpus / "out"
    real = td._write_domain
    calls = []

    def dies_on_second_domain(*a, **k):
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill mid-way")
        return real(*a, **k)

    monkeypatch.setattr(td, "_write_domain", dies_on_second_domain)
    with pytest.raises(KeyboardInterrupt):
        td.tokenize_domains(str(corpus / "in"), str(out), tokenizer_dir, SEQ, 5, workers=1, progress=False)
    assert calls == ["alpha", "beta"]  # it really stopped mid-way
    assert not out.exists()
    assert not [p for p in os.listdir(corpus) if p.startswith(".out")]  # no partial temp dir left
    monkeypatch.setattr(td, "_write_domain", real)

    rerun = td.tokenize_domains(str(corpus / "in"), str(out), tokenizer_dir, SEQ, 5, workers=1, progress=False)
    assert json.load(open(out / "stats.json")) == rerun == clean
    with pytest.raises(FileExistsError):
        td.tokenize_domains(str(corpus / "in"), str(out), tokenizer_dir, SEQ, 5, workers=1, progress=False)


def test_malformed_line_reports_file_and_line(corpus, tokenizer_dir, capsys):
    bad = corpus / "in" / "beta" / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"text": "w3"}\n{"text": "w4" oops\n{"nottext": 1}\n')
    with pytest.raises(td.BadLineError, match=r"bad\.jsonl:3: invalid JSON"):
        td.tokenize_domains(str(corpus / "in"), str(corpus / "o1"), tokenizer_dir, SEQ, 5, workers=1, progress=False)
    assert not (corpus / "o1").exists()
    # the CLI prints the same location and exits non-zero
    rc = td.main(["--input", str(corpus / "in"), "--out", str(corpus / "o2"), "--tokenizer", tokenizer_dir,
                  "--seq-len", str(SEQ), "--eval-sequences", "5", "--workers", "1", "--no-progress"])
    assert rc == 2 and "bad.jsonl:3: invalid JSON" in capsys.readouterr().err
    stats = td.tokenize_domains(str(corpus / "in"), str(corpus / "o3"), tokenizer_dir, SEQ, 5, workers=1,
                                skip_bad_lines=True, progress=False)
    assert stats["skipped_lines"]["total"] == 2
    assert stats["skipped_lines"]["by_reason"] == {"invalid JSON": 1, "no 'text' key": 1}


def test_uint32_when_vocab_does_not_fit_uint16():
    assert td.token_dtype(65536) == "uint16" and td.token_dtype(65537) == "uint32"


def test_local_corpus_is_deterministic_capped_and_tokenizable(tmp_path, tokenizer_dir):
    a = local_corpus.build_local_corpus(str(tmp_path / "a"), max_bytes_per_domain=30_000, max_doc_bytes=8_000)
    b = local_corpus.build_local_corpus(str(tmp_path / "b"), max_bytes_per_domain=30_000, max_doc_bytes=8_000)
    assert sorted(a) == sorted(local_corpus.DOMAINS)
    for d in a:
        assert 0 < a[d]["bytes"] <= 30_000 and a[d]["docs"] >= 1
        assert open(a[d]["path"], "rb").read() == open(b[d]["path"], "rb").read()
        first = json.loads(open(a[d]["path"]).readline())
        assert first["meta"]["domain"] == d and first["text"]
    code = json.loads(open(a["code"]["path"]).readline())
    assert code["meta"]["source"].endswith(".py")
    # and the result feeds tokenize_domains (domain = directory name)
    stats = td.tokenize_domains(str(tmp_path / "a"), str(tmp_path / "mds"), tokenizer_dir, SEQ, 2, workers=1,
                                progress=False)
    assert sorted(stats["domains"]) == sorted(local_corpus.DOMAINS)


def test_local_corpus_empty_domain_is_an_error(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"domain 'docs' is empty.*nothing"):
        local_corpus.build_local_corpus(str(tmp_path / "o"), domains=["docs"], roots={"docs": [str(empty)]})


def test_empty_domain_directory_or_jsonl_file_is_an_error(corpus, tokenizer_dir, capsys):
    (corpus / "in" / "delta").mkdir()
    with pytest.raises(ValueError, match=r"domain 'delta': input directory .*delta has no JSONL files"):
        td.tokenize_domains(str(corpus / "in"), str(corpus / "o1"), tokenizer_dir, SEQ, 5, workers=1, progress=False)
    rc = td.main(["--input", str(corpus / "in"), "--out", str(corpus / "o1"), "--tokenizer", tokenizer_dir,
                  "--seq-len", str(SEQ), "--eval-sequences", "5", "--workers", "1", "--no-progress"])
    assert rc == 2 and "domain 'delta'" in capsys.readouterr().err
    (corpus / "in" / "delta" / "part.jsonl").write_text("\n")  # a file with no document
    with pytest.raises(ValueError, match=r"delta/part\.jsonl: empty JSONL file \(domain 'delta'\)"):
        td.tokenize_domains(str(corpus / "in"), str(corpus / "o1"), tokenizer_dir, SEQ, 5, workers=1, progress=False)
    os.remove(corpus / "in" / "delta" / "part.jsonl")
    os.rmdir(corpus / "in" / "delta")
    (corpus / "in" / "alpha" / "part3.jsonl").write_text("")  # also beside non-empty files of its domain
    with pytest.raises(ValueError, match=r"alpha/part3\.jsonl: empty JSONL file \(domain 'alpha'\)"):
        td.tokenize_domains(str(corpus / "in"), str(corpus / "o1"), tokenizer_dir, SEQ, 5, workers=2, progress=False)
    empty = corpus / "nothing"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"input directory .*nothing has no JSONL files"):
        td.tokenize_domains(str(empty), str(corpus / "o1"), tokenizer_dir, SEQ, 5, workers=1, progress=False)
    assert not (corpus / "o1").exists()


def test_all_lines_skipped_is_a_missing_domain_error(corpus, tokenizer_dir):
    (corpus / "in" / "delta").mkdir()
    (corpus / "in" / "delta" / "bad.jsonl").write_text("not json\n{\"x\": 1}\n")
    with pytest.raises(ValueError, match=r"domain 'delta': no documents in its input files"):
        td.tokenize_domains(str(corpus / "in"), str(corpus / "o"), tokenizer_dir, SEQ, 5, workers=1,
                            skip_bad_lines=True, progress=False)


def _running(pid):
    """Alive and not a zombie (an orphan's reaper may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigkill_kills_the_workers_and_the_rerun_removes_the_partial_dir(corpus, tokenizer_dir):
    """SIGKILL the parent while both workers tokenize: they die with it; the rerun leaves no temp dir."""
    marks = corpus / "marks"
    marks.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import os, sys, time; sys.path.insert(0, sys.argv[1])\n"
              "from data_prep import tokenize_domains as td\n"
              "def slow(job):\n"
              "    open(os.path.join(sys.argv[2], str(os.getpid())), 'w').close(); time.sleep(300)\n"
              "td._tokenize_file = slow  # inherited by the forked workers\n"
              "td.tokenize_domains(sys.argv[3], sys.argv[4], sys.argv[5], 16, 5, workers=2, progress=False)\n")
    out = corpus / "out"
    proc = subprocess.Popen([sys.executable, "-c", script, repo, str(marks), str(corpus / "in"), str(out),
                             tokenizer_dir])
    workers = []
    try:
        deadline = time.time() + 240
        while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = [int(p) for p in os.listdir(marks)]
        assert len(workers) == 2, f"workers did not start (exit code {proc.poll()})"
        partials = [p for p in os.listdir(corpus) if p.startswith(".out.partial-")]
        assert len(partials) == 1
    finally:
        proc.kill()
        proc.wait()
    try:
        deadline = time.time() + 20
        while any(_running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _running(w)], "tokenizer workers outlived their killed parent"
    finally:
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)
    assert (corpus / partials[0]).is_dir()  # SIGKILL left it
    td.tokenize_domains(str(corpus / "in"), str(out), tokenizer_dir, SEQ, 5, workers=1, progress=False)
    assert sorted(p for p in os.listdir(corpus) if p.startswith(".out")) == []
    assert (out / "stats.json").is_file()
