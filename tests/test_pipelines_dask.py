"""Both conversion jobs on Beam's DaskRunner: a LocalCluster, then separate scheduler and worker processes.

Outputs must equal the DirectRunner's byte for byte, and no `beam-temp-*` or job temp folder may
remain. Every cluster listens on 127.0.0.1 only and is stopped by the test that started it.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

distributed = pytest.importorskip("distributed")

from pipelines import convert_finetune, convert_pretrain  # noqa: E402

pytestmark = pytest.mark.slow

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CLASSES = {
    "tls13": ["arkime-curl-tls13.pcap", "zeek-tls13-psk.pcap", "zeek-tls13-hrr.pcap"],
    "ssh": ["scapy-ssh-ed25519.pcap", "zeek-ssh-reverse.pcap", "zeek-ssh1-ssh2-fingerprints.pcap"],
}


@pytest.fixture(scope="module", autouse=True)
def worker_path():
    """Let Dask worker processes import etbert_jax and pipelines from this checkout."""
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), previous) if p)
    yield
    if previous is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = previous


@pytest.fixture(scope="module")
def capture_tree(tmp_path_factory, sample_captures):
    root = tmp_path_factory.mktemp("tree")
    for label, names in CLASSES.items():
        for name in names:
            (root / label).mkdir(exist_ok=True)
            (root / label / name).write_bytes((sample_captures / label / name).read_bytes())
    (root / "ssh" / "broken.pcap").write_text("<html>not a capture</html>")
    return root


def run_both(tree: pathlib.Path, output: pathlib.Path, beam_flags: list[str]) -> dict:
    pretrain = convert_pretrain.run([str(tree), "--output", str(output / "pretrain"), "--num_shards", "2",
                                     "--pair_buckets", "2"] + beam_flags)
    finetune = convert_finetune.run([str(tree), "--output", str(output / "finetune"), "--num_shards", "2",
                                     "--tsv"] + beam_flags)
    return {"pretrain": pretrain, "finetune": finetune}


def output_files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def direct_outputs(capture_tree, tmp_path_factory):
    output = tmp_path_factory.mktemp("direct")
    manifests = run_both(capture_tree, output, ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    return output, manifests


def assert_same_as_direct(direct_outputs, output: pathlib.Path, manifests: dict) -> None:
    direct_folder, direct_manifests = direct_outputs
    expected, found = output_files(direct_folder), output_files(output)
    assert sorted(found) == sorted(expected)
    for name in expected:
        assert found[name] == expected[name], f"{name} differs between DaskRunner and DirectRunner"
    for job in ("pretrain", "finetune"):
        assert manifests[job]["counts"] == direct_manifests[job]["counts"]
        assert manifests[job]["dead_letter"] == direct_manifests[job]["dead_letter"]
        on_disk = json.loads((output / job / "manifest.json").read_text())
        assert on_disk["counts"]["packets_read"] == (
            on_disk["counts"]["packets_used"] + sum(on_disk["counts"]["packets_skipped"].values()))
    assert not list(output.rglob("beam-temp-*"))
    assert not list(output.rglob(".etbert-tmp"))


def test_local_cluster_matches_direct(capture_tree, direct_outputs, tmp_path):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        manifests = run_both(capture_tree, tmp_path, ["--runner=DaskRunner",
                                                      f"--dask_client_address={cluster.scheduler_address}"])
    assert manifests["pretrain"]["counts"]["examples"] > 0
    assert [item["file"] for item in manifests["finetune"]["dead_letter"]] == ["ssh/broken.pcap"]
    assert_same_as_direct(direct_outputs, tmp_path, manifests)


def start(command: list[str], log_path: pathlib.Path, cwd: pathlib.Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=dict(os.environ))


def test_scheduler_and_worker_processes(capture_tree, direct_outputs, tmp_path):
    """A 'multi-node' cluster: one `dask scheduler` and two `dask worker` OS processes on localhost."""
    dask_cli = [sys.executable, "-m", "dask"]
    scheduler_file = tmp_path / "scheduler.json"
    processes = [start(dask_cli + ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                   "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log", tmp_path)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        assert scheduler_file.exists(), (tmp_path / "scheduler.log").read_text()
        for number in range(2):
            processes.append(start(dask_cli + ["worker", "--scheduler-file", str(scheduler_file), "--host",
                                               "127.0.0.1", "--nthreads", "1", "--no-dashboard", "--name",
                                               f"worker-{number}"], tmp_path / f"worker-{number}.log", tmp_path))
        address = json.loads(scheduler_file.read_text())["address"]
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            assert len(client.scheduler_info()["workers"]) == 2

        output = tmp_path / "out"
        manifests = run_both(capture_tree, output, ["--runner=DaskRunner", f"--dask_client_address={address}",
                                                   "--dask_npartitions=2"])
        assert_same_as_direct(direct_outputs, output, manifests)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)
