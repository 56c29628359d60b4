"""What the local tier buys on the way to S3 (a moto S3 server on 127.0.0.1 stands in for the remote).

    PYTHONPATH=src python benchmarks/tiers.py [--mb 600] [--steps 60] [--every 20] [--step-s 0.1]

Reported, in one run:
- stall per save (what ``save()`` costs the training loop, median of 3): ``local_dir`` + S3 vs a local-only
  manager (goal <= 1.10x);
- time until the checkpoint is durable on S3: ``save()`` + ``wait_until_finished()`` through the tiers vs a
  direct ``save()`` to S3;
- end-to-end overhead of checkpointing a ``--mb`` MB state every ``--every`` steps of ``--step-s`` seconds of
  compute: through the tiers vs directly to S3 (goal: tiers <= 1/3 of direct). Overhead = wall time - compute.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import autockpt  # noqa: E402


def moto() -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    assert exe, "moto_server not found (pip install 'moto[server]')"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=600)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--step-s", type=float, default=0.1)
    args = ap.parse_args()
    proc, endpoint = moto()
    import botocore.session

    s3 = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                                      aws_access_key_id="x", aws_secret_access_key="x")
    opts = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    tmp = Path(tempfile.mkdtemp(prefix="autockpt-bench-tiers-"))

    def bucket() -> str:
        name = f"b-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=name)
        return f"s3://{name}/run"

    state = {"w": torch.randn(int(args.mb * 1e6) // 4)}
    print(f"state {args.mb:.0f} MB; remote: moto S3 on 127.0.0.1; local tier: {tmp}")
    try:
        # 1. stall per save
        def stall(**kw: object) -> float:
            times = []
            with autockpt.CheckpointManager(max_to_keep=2, **kw) as mgr:  # type: ignore[arg-type]
                for step in range(1, 4):
                    t0 = time.perf_counter()
                    mgr.save(step, state)
                    times.append(time.perf_counter() - t0)
                    mgr.wait_until_finished()  # the next save starts with the uploads done (a quiet disk)
            return statistics.median(times)

        local_only = stall(directory=tmp / "local-only")
        tiered = stall(directory=bucket(), storage_options=opts, local_dir=tmp / "tier1")
        print(f"stall per save: local-only {local_only:.2f} s, tiers {tiered:.2f} s: {tiered / local_only:.2f}x")

        # 2. time until durable
        with autockpt.CheckpointManager(bucket(), storage_options=opts) as mgr:
            t0 = time.perf_counter()
            mgr.save(1, state)
            direct = time.perf_counter() - t0
        with autockpt.CheckpointManager(bucket(), storage_options=opts, local_dir=tmp / "tier2") as mgr:
            t0 = time.perf_counter()
            mgr.save(1, state)
            mgr.wait_until_finished()
            durable = time.perf_counter() - t0
        print(f"time until durable: direct S3 save {direct:.2f} s, tiers {durable:.2f} s: {durable / direct:.2f}x")

        # 3. end to end
        def run(**kw: object) -> float:
            t0 = time.perf_counter()
            with autockpt.CheckpointManager(max_to_keep=2, save_interval_steps=args.every, **kw) as mgr:  # type: ignore[arg-type]
                for step in range(1, args.steps + 1):
                    time.sleep(args.step_s)  # the compute of one step
                    state["w"][:1] += 1
                    mgr.save(step, state)
                t_loop = time.perf_counter() - t0
            return t_loop - args.steps * args.step_s

        compute = args.steps * args.step_s
        d = run(directory=bucket(), storage_options=opts)
        t = run(directory=bucket(), storage_options=opts, local_dir=tmp / "tier3")
        print(f"end to end, {args.steps} steps of {args.step_s:g} s ({compute:.0f} s compute), a save every "
              f"{args.every}: overhead direct S3 {d:.2f} s, tiers {t:.2f} s: {t / d:.2f}x (the last uploads "
              "finish in close(), not counted)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
