"""train.py with an object-store save_folder (moto S3 server): checkpoints, metrics.jsonl and the
sliced HF directory land in the bucket; a second run in a fresh working directory autoresumes from
the bucket and its metrics file continues the first run's. Config errors of a URI save_folder. A
save_overwrite run deletes the earlier run's objects from the bucket, and the uploaded HF directory
holds exactly the new run's files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from composer_sheared.config import ConfigError, load_config
from composer_sheared.storage.fetch import download_prefix
from composer_sheared.run.remote_save import check_fresh, clear_previous_remote_run, upload_outputs
from composer_sheared.demo.plots import read_jsonl, series
from tests.conftest import REPO, TARGET, prune_yaml, subprocess_env
from tests.s3 import s3  # noqa: F401  (fixture)

FAST_UPLOAD = Path(__file__).parent / "fast_upload"  # its sitecustomize shortens Composer's upload polling


def _train(s3, cwd, *args, rc=0):  # noqa: F811
    cwd.mkdir(parents=True, exist_ok=True)
    # a fresh working directory per run, as a new platform container: nothing local survives
    env = {**subprocess_env(), **s3.env}
    env["PYTHONPATH"] = f"{FAST_UPLOAD}{os.pathsep}{env['PYTHONPATH']}"
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == rc, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_checkpoints_metrics_and_hf_dir_go_to_the_bucket_and_autoresume(s3, mds, tmp_path):  # noqa: F811
    from transformers import AutoConfig

    s3.client.create_bucket(Bucket="ckpt")
    y = tmp_path / "prune.yaml"
    OmegaConf.save(OmegaConf.create(prune_yaml(mds, "s3://ckpt/runs/{run_name}", steps=2)), y)
    r = _train(s3, tmp_path / "c1", y, "autoresume=true", f"local_save_folder={tmp_path / 'stage1'}")
    keys = s3.keys("ckpt", "runs/tiny-prune/")
    assert {"runs/tiny-prune/ep0-ba2-rank0.pt", "runs/tiny-prune/latest-rank0.pt.symlink",
            "runs/tiny-prune/metrics.jsonl", "runs/tiny-prune/pruned_hf/config.json",
            "runs/tiny-prune/pruned_hf/model.safetensors"} <= set(keys), keys
    assert "uploaded s3://ckpt/runs/tiny-prune/pruned_hf" in r.stdout
    assert (tmp_path / "stage1" / "pruned_hf" / "config.json").is_file()  # staged locally first

    hf = download_prefix("s3://ckpt/runs/tiny-prune/pruned_hf", tmp_path / "pruned_hf", progress=False)
    c = AutoConfig.from_pretrained(hf)
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (
        TARGET["num_layers"], TARGET["hidden_size"], TARGET["intermediate_size"])

    # the run's config went up beside its checkpoints; a relaunch in a new container that changes
    # what defines the run is refused before the model loads, and writes nothing
    s3.client.download_file("ckpt", "runs/tiny-prune/run_config.yaml", str(tmp_path / "run_config.yaml"))
    assert OmegaConf.load(tmp_path / "run_config.yaml").seed == 17
    before = s3.keys("ckpt", "runs/tiny-prune/")
    r = _train(s3, tmp_path / "c1b", y, "autoresume=true", "seed=18", "max_duration=4ba",
               f"local_save_folder={tmp_path / 'stage1b'}", rc=2)
    assert "error: seed: 18, but the run being resumed has 17 (s3://ckpt/runs/tiny-prune/run_config.yaml)" \
        in r.stderr, r.stderr[-2000:]
    assert s3.keys("ckpt", "runs/tiny-prune/") == before and not (tmp_path / "stage1b" / "pruned_hf").exists()

    # longer, in a new container: resumes at batch 2 from the bucket (the longer duration is a change
    # a resume may make, and says so), and the uploaded metrics file holds both attempts
    r = _train(s3, tmp_path / "c2", y, "autoresume=true", "max_duration=4ba",
               f"local_save_folder={tmp_path / 'stage2'}")
    assert "warning: resume: max_duration changed from '2ba' to '4ba'" in r.stderr, r.stderr[-2000:]
    assert "has no run_config.yaml" not in r.stderr
    assert "runs/tiny-prune/ep0-ba4-rank0.pt" in s3.keys("ckpt", "runs/tiny-prune/")
    s3.client.download_file("ckpt", "runs/tiny-prune/metrics.jsonl", str(tmp_path / "metrics.jsonl"))
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    starts = [line["run"]["start_batch"] for line in lines if "run" in line]
    assert starts == [0, 2]
    assert series(recs, "shearing/expected_params")[0] == [1, 2, 3, 4]

    # a fresh run into that folder stops before training (Composer would refuse at the first upload)
    cfg, _ = load_config(str(y), [f"local_save_folder={tmp_path / 'stage3'}"])
    with pytest.raises(ConfigError, match=r"^save_folder: s3://ckpt/runs/tiny-prune holds checkpoints of an earlier "
                                          r"run \(latest-rank0.pt.symlink\); set autoresume=true"):
        check_fresh(cfg)
    check_fresh(load_config(str(y), ["save_folder=s3://ckpt/runs/other"])[0])  # an empty folder is fine


def _errors(tmp_path, mds, *overrides):
    y = tmp_path / "p.yaml"
    OmegaConf.save(OmegaConf.create(prune_yaml(mds, "s3://ckpt/run")), y)
    with pytest.raises(ConfigError) as info:
        load_config(str(y), list(overrides))
    return info.value.problems


def test_uri_save_folder_config_errors(tmp_path, mds):
    problems = _errors(tmp_path, mds, "run_name=null", "dry_run=true")  # checked in dry runs too
    assert ("save_folder", "s3://ckpt/run is an object store: set run_name (Composer's autoresume finds the "
                           "run's checkpoints there by it)") in problems
    problems = dict(_errors(tmp_path, mds, "save_folder=ftp://host/run"))
    assert problems["save_folder"].startswith("ftp://host/run: unknown object store ftp://; expected a local folder "
                                              "or one of ") and "s3://" in problems["save_folder"]
    assert dict(_errors(tmp_path, mds, "hf_save_dir=s3://ckpt/hf"))["hf_save_dir"].startswith(
        "expected a local path, got s3://ckpt/hf")
    assert dict(_errors(tmp_path, mds, f"save_folder={tmp_path / 'out'}", "local_save_folder=stage"))[
        "local_save_folder"].startswith("only used with an object-store save_folder")


def test_uri_save_folder_stages_outputs_locally(tmp_path, mds):
    from composer_sheared.config import hf_output_dir, metrics_path

    y = tmp_path / "p.yaml"
    OmegaConf.save(OmegaConf.create(prune_yaml(mds, "s3://ckpt/run")), y)
    cfg, _ = load_config(str(y), [])
    assert (metrics_path(cfg), hf_output_dir(cfg)) == (Path("runs/tiny-prune/metrics.jsonl"),
                                                       Path("runs/tiny-prune/pruned_hf"))
    cfg, _ = load_config(str(y), [f"local_save_folder={tmp_path / 's'}"])
    assert hf_output_dir(cfg) == tmp_path / "s" / "pruned_hf"


# an earlier run in s3://ckpt/runs/tiny-prune: a later checkpoint than the new run reaches, the
# `latest` link to it, its metrics and a sharded HF directory (the new run writes one file)
OLD_RUN = ["ep0-ba500-rank0.pt", "latest-rank0.pt.symlink", "metrics.jsonl", "run_config.yaml", "pruned_hf/config.json",
           "pruned_hf/model-00001-of-00002.safetensors", "pruned_hf/model.safetensors.index.json"]
# a user's file in the folder, a folder whose name extends the HF one, and another run's folder
NOT_OURS = ["runs/tiny-prune/notes.txt", "runs/tiny-prune/pruned_hf-old/config.json",
            "runs/tiny-prune-2/ep0-ba1-rank0.pt"]


def _bucket_with_earlier_run(s3):  # noqa: F811
    s3.client.create_bucket(Bucket="ckpt")
    for key in [*(f"runs/tiny-prune/{n}" for n in OLD_RUN), *NOT_OURS]:
        s3.client.put_object(Bucket="ckpt", Key=key, Body=b"old")


def _remote_cfg(tmp_path, mds, *overrides, folder="s3://ckpt/runs/{run_name}"):
    y = tmp_path / "remote.yaml"
    OmegaConf.save(OmegaConf.create(prune_yaml(mds, folder, steps=2)), y)
    return load_config(str(y), [f"local_save_folder={tmp_path / 'stage'}", *overrides])[0]


def _new_hf_dir(cfg):
    from composer_sheared.config import hf_output_dir

    hf = hf_output_dir(cfg)
    hf.mkdir(parents=True)
    (hf / "config.json").write_text('{"new": true}')
    (hf / "model.safetensors").write_bytes(b"new weights")
    return hf


def test_fresh_save_overwrite_run_deletes_the_earlier_run_from_the_bucket(s3, mds, tmp_path, caplog):  # noqa: F811
    from composer_sheared.run.recipe import _start_ranks

    _bucket_with_earlier_run(s3)
    before = s3.keys("ckpt")
    # resuming with save_overwrite: the earlier objects are the run's own, nothing is deleted
    assert clear_previous_remote_run(_remote_cfg(tmp_path, mds, "save_overwrite=true", "autoresume=true")) == []
    assert s3.keys("ckpt") == before

    cfg = _remote_cfg(tmp_path, mds, "save_overwrite=true")
    with caplog.at_level("WARNING", logger="train"):
        assert _start_ranks(cfg, has_gpu=False) == cfg.global_train_batch_size  # where train.py clears
    assert s3.keys("ckpt") == sorted(NOT_OURS)
    assert f"deleted {len(OLD_RUN)} object(s) of the earlier run from s3://ckpt/runs/tiny-prune" in caplog.text

    upload_outputs(cfg, _new_hf_dir(cfg))
    assert s3.keys("ckpt", "runs/tiny-prune/pruned_hf/") == ["runs/tiny-prune/pruned_hf/config.json",
                                                             "runs/tiny-prune/pruned_hf/model.safetensors"]


def test_autoresume_compares_with_the_config_in_the_bucket(s3, mds, tmp_path):  # noqa: F811
    from composer_sheared.config import plain
    from composer_sheared.run.remote_save import check_remote_resume, upload_run_config
    from composer_sheared.run.resume import write_run_config

    s3.client.create_bucket(Bucket="ckpt")
    first = _remote_cfg(tmp_path, mds, "autoresume=true")
    assert check_remote_resume(first) == (True, [])  # an empty folder: the first attempt
    assert upload_run_config(first, write_run_config(plain(OmegaConf.structured(first)), tmp_path / "stage")) == \
        "s3://ckpt/runs/tiny-prune/run_config.yaml"
    s3.client.put_object(Bucket="ckpt", Key="runs/tiny-prune/ep0-ba2-rank0.pt", Body=b"ckpt")

    # a new container stages elsewhere and trains longer: changes a resume may make, returned
    again = _remote_cfg(tmp_path, mds, "autoresume=true", "max_duration=4ba", f"local_save_folder={tmp_path / 'c2'}")
    assert check_remote_resume(again) == (True, [("local_save_folder", str(tmp_path / "stage"), str(tmp_path / "c2")),
                                                 ("max_duration", "2ba", "4ba")])
    # another seed and target would continue a different run: refused, each key named
    with pytest.raises(ConfigError) as info:
        check_remote_resume(_remote_cfg(tmp_path, mds, "autoresume=true", "seed=18", "pruning.target.num_layers=1"))
    assert [k for k, _ in info.value.problems] == ["pruning.target.num_layers", "seed"]
    assert info.value.problems[1][1].startswith(
        "18, but the run being resumed has 17 (s3://ckpt/runs/tiny-prune/run_config.yaml); a resume cannot change")
    # a folder an older version wrote: nothing to compare with, which start_resume warns of
    s3.client.delete_object(Bucket="ckpt", Key="runs/tiny-prune/run_config.yaml")
    assert check_remote_resume(first) == (False, [])
    assert check_remote_resume(_remote_cfg(tmp_path, mds)) == (True, [])  # a fresh run compares nothing


def test_upload_outputs_deletes_hf_files_the_upload_does_not_write(s3, mds, tmp_path, monkeypatch):  # noqa: F811
    from composer.utils import S3ObjectStore

    _bucket_with_earlier_run(s3)
    # autoresume: the earlier objects are not cleared at the start, so the upload must replace the prefix
    cfg = _remote_cfg(tmp_path, mds, "save_overwrite=true", "autoresume=true")
    seen, upload = {}, S3ObjectStore.upload_object

    def recording(store, name, filename, **kw):
        if name.endswith("/config.json"):  # what a reader finds once the new config.json is there
            seen[name] = s3.keys("ckpt", name.rsplit("/", 1)[0] + "/")
        return upload(store, name, filename, **kw)

    monkeypatch.setattr(S3ObjectStore, "upload_object", recording)
    upload_outputs(cfg, _new_hf_dir(cfg))
    hf = "runs/tiny-prune/pruned_hf"
    assert s3.keys("ckpt", f"{hf}/") == [f"{hf}/config.json", f"{hf}/model.safetensors"]
    assert s3.client.get_object(Bucket="ckpt", Key=f"{hf}/config.json")["Body"].read() == b'{"new": true}'
    assert seen == {f"{hf}/config.json": [f"{hf}/config.json", f"{hf}/model.safetensors"]}  # the stale shards gone
    assert set(NOT_OURS) | {f"runs/tiny-prune/{n}" for n in OLD_RUN if "/" not in n} <= set(s3.keys("ckpt"))


def test_store_without_delete_refuses_to_mix_runs(mds, tmp_path, monkeypatch):
    from composer_sheared.run import remote_save
    from composer_sheared.storage import fetch

    with pytest.raises(fetch.FetchError, match=r"^gs://b/x: cannot delete objects from a gs:// store"):
        fetch.delete_names("gs://b/x", ["a"])
    cfg = _remote_cfg(tmp_path, mds, "save_overwrite=true", folder="gs://ckpt/runs/{run_name}")
    listed = ["notes.txt"]
    monkeypatch.setattr(remote_save, "list_names", lambda uri: list(listed))
    assert clear_previous_remote_run(cfg) == []  # nothing of an earlier run: nothing to delete
    check_fresh(cfg)
    listed += OLD_RUN
    expected = (r"^save_folder: gs://ckpt/runs/tiny-prune holds an earlier run \(7 object\(s\), e.g. "
                r"ep0-ba500-rank0.pt\) that save_overwrite=true must delete, and a gs:// store cannot delete "
                r"objects; empty the folder")
    with pytest.raises(ConfigError, match=expected):
        check_fresh(cfg)  # every rank, before anything is built
    with pytest.raises(ConfigError, match=expected):
        clear_previous_remote_run(cfg)

    # an upload that would leave an earlier upload's files beside its own uploads nothing
    class Store:
        uploaded = []

        def list_objects(self, prefix):
            return [f"{prefix}model-00001-of-00002.safetensors", f"{prefix}config.json"]

        def upload_object(self, name, filename, **kw):
            self.uploaded.append(name)

    monkeypatch.setattr(fetch, "_store", lambda uri, bounds=None: (Store(), "runs/tiny-prune/pruned_hf"))
    with pytest.raises(fetch.FetchError, match=r"^gs://ckpt/runs/tiny-prune/pruned_hf: holds 1 object\(s\) this "
                                               r"upload would not replace \(e.g. model-00001-of-00002.safetensors\)"):
        upload_outputs(cfg, _new_hf_dir(cfg))
    assert Store.uploaded == []
