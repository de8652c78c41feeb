"""Bad data found from its index files before loading (config: `error: <key>: <file>: ...`; the
library classes: a ValueError naming the file), and bad inputs to the data-prep tools named by
file and line."""
from __future__ import annotations

import gzip
import json
import shutil

import pytest
from omegaconf import OmegaConf

from composer_sheared.config import ConfigError, load_config
from composer_sheared.data import DynamicStreamingDataset, domain_eval_dataset
from data_prep import fit_reference_losses, next_line_task
from data_prep import tokenize_domains as td
from tests.conftest import DOMAINS, SEQ, make_data, prune_yaml, tiny_tokenizer


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path / "mds", n_train=16, n_eval=4)


def problems(data, tmp_path, *overrides):
    y = tmp_path / "c.yaml"
    OmegaConf.save(OmegaConf.create(prune_yaml(data, tmp_path / "out")), y)
    with pytest.raises(ConfigError) as err:
        load_config(str(y), list(overrides))
    return err.value.problems


def open_train(data):
    return DynamicStreamingDataset(str(data), list(DOMAINS), [0.5, 0.5], batch_size=4)


def shard(data, split="train", domain="beta"):
    return data / split / domain / "shard.00000.mds"


@pytest.mark.parametrize("text, says", [("", "the file is empty"), ("{not json", "not JSON")])
def test_unreadable_index_is_named(data, tmp_path, text, says):
    index = data / "train" / "beta" / "index.json"
    index.write_text(text)
    (key, msg), = problems(data, tmp_path)
    assert key == "data.local" and msg.startswith(f"{index}: {says}")
    with pytest.raises(ValueError, match=rf"^{index}: {says}"):
        open_train(data)


def test_domain_without_samples(data, tmp_path):
    index = data / "train" / "beta" / "index.json"
    index.write_text(json.dumps({"version": 2, "shards": []}))
    assert problems(data, tmp_path) == [("data.domains[1]", f"{index}: domain 'beta' split 'train' has no samples")]
    with pytest.raises(ValueError, match=r"domain 'beta' split 'train' under .* has no samples"):
        open_train(data)
    eindex = data / "eval" / "beta" / "index.json"
    eindex.write_text(json.dumps({"version": 2, "shards": []}))
    with pytest.raises(ValueError, match=rf"domain 'beta' split 'eval': {eindex} lists no samples"):
        domain_eval_dataset(str(data), "beta", batch_size=4)


def test_domain_missing_its_eval_split(data, tmp_path):
    shutil.rmtree(data / "eval" / "beta")
    (data / "eval" / "beta").mkdir()  # the directory is there, its MDS index is not
    index = data / "eval" / "beta" / "index.json"
    assert problems(data, tmp_path) == [("data.domains[1]", f"'beta' has no split 'eval': {index} does not exist "
                                                            f"(run data_prep/tokenize_domains.py)")]


def test_shard_of_the_wrong_size_or_hash_fails_validation(data, tmp_path):
    path = shard(data)
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    (key, msg), = problems(data, tmp_path)
    assert key == "data.local" and msg.startswith(f"{path} has {len(raw) - 10} bytes, ") and "says" in msg
    path.write_bytes(raw[:100] + bytes(len(raw) - 164) + raw[-64:])  # same size, zeroed samples
    (key, msg), = problems(data, tmp_path)
    assert key == "data.local" and msg.startswith(f"{path} does not match its xxh3_64 hash in ")


def test_domain_of_another_sequence_length(tmp_path):
    data = make_data(tmp_path / "mds", domains=("alpha",), n_train=16, n_eval=4)
    beta = make_data(tmp_path / "other", domains=("beta",), n_train=16, n_eval=4, seq=SEQ // 2)
    for split in ("train", "eval"):
        shutil.copytree(beta / split / "beta", data / split / "beta")
    probs = problems(data, tmp_path)
    assert ("max_seq_len", f"{SEQ}, but {data / 'train' / 'beta' / 'index.json'} (and 1 more index files) holds "
                           f"samples of {SEQ // 2} tokens") in probs
    with pytest.raises(ValueError, match=rf"domain 'beta' split 'train': {data}/train/beta/index.json holds samples "
                                         rf"of {SEQ // 2} tokens, .*alpha/index.json of {SEQ}: every domain needs "
                                         rf"one sequence length"):
        open_train(data)


def test_stats_json_not_json(data, tmp_path):
    (data / "stats.json").write_text("{oops")
    (key, msg), = problems(data, tmp_path)
    assert key == "data.local" and msg.startswith(f"{data / 'stats.json'}: not JSON")


def test_max_seq_len_checked_against_the_index_without_stats_json(data, tmp_path):
    (data / "stats.json").unlink()
    (key, msg), = problems(data, tmp_path, "max_seq_len=64")
    assert key == "max_seq_len" and msg.startswith("64, but ") and msg.endswith(f"holds samples of {SEQ} tokens")


# -- data-prep tools ------------------------------------------------------------------------


def test_jsonl_gz_that_is_not_gzip_is_named(tmp_path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    bad = tmp_path / "in" / "a" / "docs.jsonl.gz"
    bad.write_text('{"text": "w2 w3"}\n')  # plain text under a .gz name
    with pytest.raises(td.BadLineError, match=rf"^{bad}:1: not a valid gzip file \(BadGzipFile"):
        td.tokenize_domains(str(tmp_path / "in"), str(tmp_path / "out"), tiny_tokenizer(), 4, 1, workers=1,
                            progress=False)
    assert not (tmp_path / "out").exists()


def test_skip_bad_lines_skips_and_counts_undecodable_lines(tmp_path):
    d = tmp_path / "in" / "a"
    d.mkdir(parents=True)
    good = "".join(json.dumps({"text": " ".join(f"w{(i + j) % 100 + 2}" for j in range(20))}) + "\n" for i in range(30))
    with gzip.open(d / "docs.jsonl.gz", "wb") as f:
        f.write(good.encode() + '{"text": "caf\u00e9"}\n'.encode("latin-1") + good.encode())
    with pytest.raises(td.BadLineError, match=rf"{d / 'docs.jsonl.gz'}:31: not UTF-8"):
        td.tokenize_domains(str(tmp_path / "in"), str(tmp_path / "o1"), tiny_tokenizer(), 8, 2, workers=1,
                            progress=False)
    stats = td.tokenize_domains(str(tmp_path / "in"), str(tmp_path / "o2"), tiny_tokenizer(), 8, 2, workers=1,
                                skip_bad_lines=True, progress=False)
    assert stats["skipped_lines"] == {"total": 1, "by_reason": {"not UTF-8": 1}}
    assert stats["domains"]["a"]["input_docs"] == 60


def test_fit_reference_losses_bad_target_and_family(tmp_path, capsys):
    assert fit_reference_losses.main(["--target", "0"]) == 2
    assert "error: --target: expected a positive parameter count, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="target: expected a positive parameter count"):
        fit_reference_losses.reference_losses(0)
    fam = tmp_path / "fam.yaml"
    fam.write_text("domains: [a]\nmodels: {m: {params: 1, losses: [1.0]\n")
    assert fit_reference_losses.main(["--target", "2.7b", "--family", str(fam)]) == 2
    assert f"error: {fam}:3:1: not YAML" in capsys.readouterr().err
    fam.write_text("domains: [a]\nmodels: [m1, m2]\n")
    assert fit_reference_losses.main(["--target", "2.7b", "--family", str(fam)]) == 2
    assert f"error: {fam}: 'domains' should be a list and 'models' a mapping" in capsys.readouterr().err


def test_next_line_task_names_an_undecodable_line(tmp_path):
    d = tmp_path / "corpus" / "a"
    d.mkdir(parents=True)
    (d / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{d / 'x.jsonl'}:2: not UTF-8"):
        next_line_task.read_raw_corpus(str(tmp_path / "corpus"))
