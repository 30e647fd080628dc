"""The distributed bench (run by scripts/bench/distributed.sh): a parted conversion of
MODEL into PARTS parts (--max-file-size SIZE) by a two-node Ray cluster on this machine
(a head and one more node process, 1 CPU each, one task per part with 1 thread) against
the CLI with 2 threads on the same plan, in alternating rounds, outputs on /dev/shm
(removed before every run). Then Ray's own cost per task: a round trip of one empty
task at a time, and 200 empty tasks at once.

    python distributed.py CLI MODEL SIZE ROUNDS
"""
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Ray on loopback only (see python/tests/test_distributed.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from modelconv import ConversionConfig  # noqa: E402
from modelconv.distributed import convert  # noqa: E402

cli, model, size, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
shm_cli, shm_ray = Path("/dev/shm/modelconv-bench-cli"), Path("/dev/shm/modelconv-bench-ray")


def hashes(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "weights.parquet").glob("part-*.parquet"))}


c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
c.add_node(num_cpus=1)
ray.init(address=c.address, log_to_driver=False)
c.wait_for_nodes()


@ray.remote(num_cpus=1)
def noop():
    return 0


ray.get([noop.remote() for _ in range(20)])  # workers started
times = {"cli": [], "ray": []}
part_secs, nodes = [], set()
try:
    for r in range(rounds + 1):  # round 0 warms the page cache and the workers
        for mode in ("cli", "ray") if r % 2 == 0 else ("ray", "cli"):
            shutil.rmtree(shm_cli if mode == "cli" else shm_ray, ignore_errors=True)
            t0 = time.monotonic()
            if mode == "cli":
                subprocess.run([cli, "convert", model, "-o", str(shm_cli), "-q", "--threads", "2",
                                "--max-file-size", size], check=True)
            else:
                res = convert(model, str(shm_ray), ConversionConfig(validate_output=False), max_file_size=size)
                assert res.success, res.error_message
                if r > 0:
                    part_secs += [t["seconds"] for t in res.tasks]
                    nodes |= {t["node"] for t in res.tasks}
            if r > 0:
                times[mode].append(time.monotonic() - t0)
        if r == 0:
            same = hashes(shm_cli) == hashes(shm_ray)
            n_parts = len(hashes(shm_cli))
            out_bytes = sum(p.stat().st_size for p in (shm_cli / "weights.parquet").glob("part-*"))
    one = []
    for _ in range(50):
        t0 = time.monotonic()
        ray.get(noop.remote())
        one.append(time.monotonic() - t0)
    t0 = time.monotonic()
    ray.get([noop.remote() for _ in range(200)])
    many = (time.monotonic() - t0) / 200
finally:
    shutil.rmtree(shm_cli, ignore_errors=True)
    shutil.rmtree(shm_ray, ignore_errors=True)
    ray.shutdown()
    c.shutdown()

med = {m: statistics.median(v) for m, v in times.items()}
print(f"input {model}: {n_parts} parts of at most {size}, {out_bytes / 1e9:.2f} GB of parts; "
      f"{rounds} rounds, alternating; parts byte-identical to the CLI's: {same}")
print(f"{'run':<34} {'median_s':>9} {'runs':>30}")
print(f"{'CLI, 2 threads':<34} {med['cli']:>9.2f} {' '.join(f'{x:.2f}' for x in times['cli']):>30}")
print(f"{'Ray, 2 nodes x 1 CPU, 1 task/part':<34} {med['ray']:>9.2f} {' '.join(f'{x:.2f}' for x in times['ray']):>30}")
print(f"ray / cli: {med['ray'] / med['cli']:.2f} (goal <= 1.15); nodes used: {len(nodes)}")
print(f"per part: median {statistics.median(part_secs):.2f} s in its task, "
      f"{out_bytes / n_parts / statistics.median(part_secs) / 1e6:.0f} MB/s of parts per 1-CPU task")
print(f"Ray per task: {statistics.median(one) * 1e3:.1f} ms round trip one at a time, "
      f"{many * 1e3:.2f} ms each for 200 at once")
