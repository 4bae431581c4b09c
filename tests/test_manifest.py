"""Tests for pipelines.manifest and pipelines.options: count merging, accounting, Beam flag handling."""

import os

import pytest
from apache_beam.runners.dask.dask_runner import DaskOptions

from pipelines import manifest, options


def test_merge_counts_adds_and_concatenates():
    first = {"packets_read": 3, "packets_skipped": {"non_ip": 1}, "dead_letter": [{"file": "a", "reason": "x"}]}
    second = {"packets_read": 4, "packets_skipped": {"non_ip": 2, "ip_fragment": 1}, "dead_letter": [],
              "sessions": 2}
    merged = manifest.merge_all([first, second, {}])
    assert merged["packets_read"] == 7
    assert merged["packets_skipped"] == {"non_ip": 3, "ip_fragment": 1}
    assert merged["dead_letter"] == [{"file": "a", "reason": "x"}]
    assert merged["sessions"] == 2
    assert first["packets_read"] == 3


def test_check_accounting():
    manifest.check_accounting({"packets_read": 5, "packets_used": 3, "packets_skipped": {"non_ip": 2}})
    with pytest.raises(RuntimeError, match="packets_read=5"):
        manifest.check_accounting({"packets_read": 5, "packets_used": 3, "packets_skipped": {}})


def test_build_manifest_layout():
    counts = {"packets_read": 1, "packets_used": 1, "packets_skipped": {}, "shards": ["x"],
              "dead_letter": [{"file": "b", "reason": "r"}, {"file": "a", "reason": "r"}]}
    built = manifest.build_manifest("pretrain", {"seed": 0}, {"vocab_kind": "bigram"}, 128, counts, ["x"])
    assert built["kind"] == "pretrain"
    assert [item["file"] for item in built["dead_letter"]] == ["a", "b"]
    assert "shards" not in built["counts"]
    assert "dead_letter" not in built["counts"]
    assert built["shards"] == ["x"]
    assert "split" not in built


def test_shard_name():
    assert manifest.shard_name("packet/train", 3, 64) == "packet/train-00003-of-00064.tfrecord"


def test_json_round_trip_and_temp_removal(tmp_path):
    job_temp = str(tmp_path / manifest.TEMP_FOLDER / "job")
    manifest.write_json(os.path.join(job_temp, "summary.json"), {"a": 1})
    assert manifest.read_json(os.path.join(job_temp, "summary.json")) == {"a": 1}
    (tmp_path / "beam-temp-train-123").mkdir()
    (tmp_path / "beam-temp-train-123" / "part").write_bytes(b"x")
    manifest.remove_temp(str(tmp_path), job_temp)
    assert not (tmp_path / "beam-temp-train-123").exists()
    assert not (tmp_path / manifest.TEMP_FOLDER).exists()


def test_remove_stale_shards(tmp_path):
    for name in ("train-00000-of-00002.tfrecord", "train-00000-of-00004.tfrecord", "other.tfrecord"):
        (tmp_path / name).write_bytes(b"")
    manifest.remove_stale_shards(str(tmp_path), "train", 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.tfrecord", "train-00000-of-00004.tfrecord"]


def test_runner_name():
    assert options.runner_name([]) == ""
    assert options.runner_name(["--runner=DataflowRunner"]) == "DataflowRunner"
    assert options.runner_name(["--runner", "apache_beam.runners.dask.dask_runner.DaskRunner"]) == "DaskRunner"


def test_beam_options_for_runners():
    dask = options.beam_options(["--runner=DaskRunner", "--dask_client_address=tcp://127.0.0.1:1"], 3)
    assert dask.get_all_options(drop_default=True)["runner"] == options.DASK_RUNNER
    dask_flags = dask.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
    assert dask_flags["npartitions"] == 3
    assert dask_flags["address"] == "tcp://127.0.0.1:1"
    chosen = options.beam_options(["--runner=DaskRunner", "--dask_npartitions=7"], 3)
    assert chosen.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)["npartitions"] == 7

    flink = options.beam_options(["--runner=FlinkRunner"]).get_all_options(drop_default=True)
    assert flink["setup_file"] == str(options.SETUP_FILE)
    direct = options.beam_options(["--direct_num_workers=2"]).get_all_options(drop_default=True)
    assert "setup_file" not in direct
    assert str(options.REPO_ROOT) in os.environ["PYTHONPATH"].split(os.pathsep)


def test_settings_from_flags():
    parser = options.argparse.ArgumentParser()
    options.add_settings_flags(parser, default_shards=64)
    args, rest = parser.parse_known_args(["--header-policy", "etbert", "--num_shards", "128", "--runner=X"])
    settings = options.settings_from_args(args)
    assert settings.header_policy == "etbert"
    assert settings.num_shards == 128
    assert settings.series is True
    assert rest == ["--runner=X"]
