"""modelconv.distributed on a real Ray cluster of two nodes on this machine (a head and
one more node process, one CPU each), started and stopped by these tests: the parts the
cluster writes are the CLI's bytes (sha256 of every part), a worker killed in the middle
of a part is retried into the same bytes, Ctrl-C commits nothing and a second run reuses
what the first wrote, and workers write to an S3-compatible server (moto, loopback)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Ray on loopback only: without this it advertises the machine's outward address (the
# route to the internet) for its GCS and nodes. The variable is the one that keeps Ray
# on 127.0.0.1 (its name is about laptops); the node processes inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="ray is not installed: scripts/setup-test-env.sh installs it from PyPI")
from ray.cluster_utils import Cluster  # noqa: E402

import modelconv  # noqa: E402
from modelconv.distributed import convert as dconvert  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MINILM = ROOT / ".cache" / "all-MiniLM-L6-v2"
CLI = ROOT / "target" / "debug" / "modelconv"
# Slow and finely stepped (zstd 19, 1 MiB row groups): a part takes seconds, long enough
# to act on a task while it runs.
SLOW = dict(compression_level=19, row_group_mb=1)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    # A worker process on each node before the tests time anything.
    assert len(set(ray.get([_where.remote() for _ in range(2)]))) == 2
    yield c
    ray.shutdown()
    c.shutdown()


@ray.remote(num_cpus=1)
def _where():
    time.sleep(1)
    return ray.get_runtime_context().get_node_id()


def cli(src, out, *args):
    """The CLI's conversion of `src` into `out`, the reference."""
    subprocess.run([str(CLI), "convert", str(src), "-o", str(out), "-q", *args], check=True)


def part_hashes(out):
    """sha256 of every part of a parted output, by name (computed here, not by modelconv)."""
    d = Path(out) / "weights.parquet"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("part-*.parquet"))}


def manifest(out):
    return json.loads((Path(out) / "weights.parquet" / "_manifest.json").read_text())


def test_a_zoo_converted_by_two_nodes_is_the_clis_bytes(cluster, tmp_path):
    zoo = [(MINILM, tmp_path / "minilm"), (FIXTURES / "tiny-clip", tmp_path / "clip"),
           (FIXTURES / "tiny-llama-sharded-bf16", tmp_path / "llama")]
    results = dconvert([(str(s), str(o)) for s, o in zoo], max_file_size="8MB", **SLOW)
    assert [r.success for r in results] == [True, True, True], [r.error_message for r in results]
    for (src, out), r in zip(zoo, results):
        ref = tmp_path / (out.name + "-cli")
        cli(src, ref, "--max-file-size", "8MB", "--level", "19", "--row-group-mb", "1")
        want = part_hashes(ref)
        assert part_hashes(out) == want and want, out.name
        assert manifest(out)["parts"] == manifest(ref)["parts"]
        assert manifest(out)["identity"] == manifest(ref)["identity"]
        assert [p["file"] for p in r.parts] == sorted(want)
        assert [t["file"] for t in r.tasks] == sorted(want)
        assert all(t["status"] == "written" and t["seconds"] > 0 for t in r.tasks)
        assert (out / "metadata.json").exists() and r.success and r.total_parameters > 0
        with modelconv.open(out) as a, modelconv.open(ref) as b:
            assert a.keys() == b.keys()
    # MiniLM's parts were spread over both nodes.
    minilm = results[0]
    assert len(minilm.tasks) >= 5
    assert len({t["node"] for t in minilm.tasks}) == 2, minilm.tasks


def running_part_task():
    """The worker pid of a running part task, or None."""
    from ray.util.state import list_tasks

    for t in list_tasks(filters=[("state", "=", "RUNNING")], detail=True):
        if t.name.endswith("_part_task") and t.worker_pid:
            return t.worker_pid
    return None


def test_a_worker_killed_in_the_middle_of_a_part_is_retried_into_the_same_bytes(cluster, tmp_path):
    ref = tmp_path / "cli"
    cli(MINILM, ref, "--max-file-size", "8MB", "--level", "19", "--row-group-mb", "1")
    out = tmp_path / "out"
    from ray.util.state import list_tasks

    # The module's cluster ran other conversions: only this one's tasks count.
    before = {a.task_id for a in list_tasks(detail=True, limit=10000)}
    box = {}
    t = threading.Thread(target=lambda: box.update(r=dconvert(str(MINILM), str(out), max_file_size="8MB", **SLOW)))
    t.start()
    deadline = time.monotonic() + 120
    pid = None
    while pid is None:
        assert time.monotonic() < deadline, "no part task ran"
        pid = running_part_task()
        time.sleep(0.05)
    # At once: the state API reports a task running some time after it started, and a
    # task that ends before the kill leaves its worker idle (nothing to retry).
    os.kill(pid, signal.SIGKILL)
    t.join(300)
    r = box["r"]
    assert r.success, r.error_message
    # Ray saw one attempt fail with the worker and ran that task again to the end (its
    # state API catches up with the tasks' events within seconds). A task killed right
    # after it started may have its attempt reported without the worker's pid.
    deadline = time.monotonic() + 30
    while True:
        attempts = [a for a in list_tasks(detail=True, limit=10000)
                    if a.name.endswith("_part_task") and a.task_id not in before]
        killed = [a for a in attempts if a.state == "FAILED"]
        again = [a.state for a in attempts if killed and a.task_id == killed[0].task_id
                 and a.attempt_number > killed[0].attempt_number]
        if (len(killed) == 1 and again == ["FINISHED"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(killed) == 1, [(a.task_id, a.attempt_number, a.state, a.worker_pid) for a in attempts]
    assert killed[0].worker_pid in (pid, None, 0), (killed[0].worker_pid, pid)
    assert again == ["FINISHED"], again
    assert part_hashes(out) == part_hashes(ref)


DRIVER = """
import sys, ray
from modelconv.distributed import convert
ray.init(address=sys.argv[1], log_to_driver=False)
r = convert(sys.argv[2], sys.argv[3], max_file_size="8MB", compression_level=19, row_group_mb=1)
print(r.success, flush=True)
"""


def test_ctrl_c_cancels_the_tasks_commits_nothing_and_a_second_run_reuses_the_parts(cluster, tmp_path):
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address, str(MINILM), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts_dir = out / "weights.parquet"
    deadline = time.monotonic() + 180
    while not any(parts_dir.glob("part-*.parquet")):
        assert time.monotonic() < deadline and driver.poll() is None, driver.stderr.read() if driver.poll() is not None else "no part"
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode != 0 and "KeyboardInterrupt" in err, err
    assert not (out / "metadata.json").exists()
    assert not (parts_dir / "_manifest.json").exists()
    # The cancelled tasks stop: the number of parts stays as it was.
    time.sleep(2)
    left = part_hashes(out)
    time.sleep(2)
    assert part_hashes(out) == left and 1 <= len(left) < 7, left
    with pytest.raises(modelconv.CorruptFileError, match="not a complete conversion"):
        modelconv.open(out)
    # A second run keeps what the first wrote and converts the rest.
    r = dconvert(str(MINILM), str(out), max_file_size="8MB", **SLOW)
    assert r.success, r.error_message
    statuses = {t["file"]: t["status"] for t in r.tasks}
    assert all(statuses[f] == "kept" for f in left), statuses
    assert sum(s == "written" for s in statuses.values()) == 7 - len(left)
    ref = tmp_path / "cli"
    cli(MINILM, ref, "--max-file-size", "8MB", "--level", "19", "--row-group-mb", "1")
    assert part_hashes(out) == part_hashes(ref)


@pytest.fixture
def s3():
    """moto's S3 server on loopback, with a bucket `out`; stopped afterwards."""
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    endpoint = None
    deadline = time.monotonic() + 60
    while endpoint is None:
        assert time.monotonic() < deadline, "moto_server did not start"
        line = server.stdout.readline()
        if "http://127.0.0.1:" in line:
            endpoint = line[line.index("http://127.0.0.1:"):].split()[0]
    threading.Thread(target=server.stdout.read, daemon=True).start()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="out")
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env, client
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.kill()
    server.wait()


def test_workers_write_their_parts_to_object_storage(cluster, s3, tmp_path):
    env, client = s3
    r = dconvert(str(MINILM), "s3://out/minilm/", max_file_size="8MB", runtime_env={"env_vars": env})
    assert r.success, r.error_message
    ref = tmp_path / "cli"
    cli(MINILM, ref, "--max-file-size", "8MB")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="out", Prefix="minilm/")["Contents"])
    assert "minilm/metadata.json" in keys and "minilm/weights.parquet/_manifest.json" in keys
    assert "minilm/weights.parquet/_journal.json" not in keys
    got = {k.rsplit("/", 1)[1]: hashlib.sha256(client.get_object(Bucket="out", Key=k)["Body"].read()).hexdigest()
           for k in keys if "/part-" in k}
    assert got == part_hashes(ref)
    assert len({t["node"] for t in r.tasks}) == 2, r.tasks
    assert not client.list_multipart_uploads(Bucket="out").get("Uploads")
