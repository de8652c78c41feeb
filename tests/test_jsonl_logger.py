"""Metrics JSONL: one file per run, appended only on resume; reports read only the latest run.
Also the prune CLI's check that --source is the model the checkpoint was pruned from."""
import json

import pytest

from composer_sheared.loggers import JSONLLogger
from composer_sheared.demo.plots import read_jsonl, series
from tests.conftest import make_trainer, tiny_model


def _fit(tmp_path, max_duration, folder="ck", **kw):
    trainer, algo = make_trainer(max_duration=max_duration, warmup="2ba", loggers=[JSONLLogger(tmp_path / "m.jsonl")],
                                 save_folder=str(tmp_path / folder), save_interval="2ba", run_name="jsonl", **kw)
    trainer.fit()
    trainer.close()
    return trainer


def test_fresh_run_truncates_resume_appends(tmp_path):
    _fit(tmp_path, "3ba", folder="ck0")
    _fit(tmp_path, "2ba")  # a second fresh run into the same metrics file
    headers = [json.loads(line)["run"] for line in (tmp_path / "m.jsonl").read_text().splitlines()
               if line.startswith('{"run"')]
    assert [h["start_batch"] for h in headers] == [0]
    assert series(read_jsonl(tmp_path / "m.jsonl"), "shearing/expected_params")[0] == [1, 2]

    _fit(tmp_path, "4ba", autoresume=True)  # resumes from ep0-ba2: appends behind its own header
    headers = [json.loads(line)["run"] for line in (tmp_path / "m.jsonl").read_text().splitlines()
               if line.startswith('{"run"')]
    assert [h["start_batch"] for h in headers] == [0, 2]
    assert series(read_jsonl(tmp_path / "m.jsonl"), "shearing/expected_params")[0] == [1, 2, 3, 4]


def test_report_reads_only_the_latest_run(tmp_path):
    p = tmp_path / "m.jsonl"
    lines = [{"run": {"start_batch": 0}}, {"step": 1, "metrics": {"x": 1.0}}, {"step": 3, "metrics": {"x": 3.0}},
             {"run": {"start_batch": 0}}, {"step": 1, "metrics": {"x": 10.0}},
             {"run": {"start_batch": 1}}, {"step": 2, "metrics": {"x": 20.0}}]
    p.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert series(read_jsonl(p), "x") == ([1, 2], [10.0, 20.0])


def test_prune_cli_says_when_source_is_not_the_checkpoints_model(tmp_path):
    from composer_sheared.export.sliced import finalize

    trainer, _ = make_trainer(max_duration="2ba", warmup="1ba", save_folder=str(tmp_path / "ck"), save_interval="2ba")
    trainer.fit()
    trainer.close()
    other = tmp_path / "other"
    tiny_model(hidden_size=48, head_dim=8).save_pretrained(other)
    with pytest.raises(SystemExit, match=r"--source .* is not the model this checkpoint was pruned from "
                                         r"\(hidden_size 48 vs 32"):
        finalize(tmp_path / "ck" / "ep0-ba2-rank0.pt", tmp_path / "out", source=str(other))
    assert not (tmp_path / "out").exists()
