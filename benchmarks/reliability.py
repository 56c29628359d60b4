"""Print autockpt's reliability figures: crashes, full disks, flaky S3, damaged and hostile checkpoints.

usage: PYTHONPATH=src python benchmarks/reliability.py [--quick]

Runs the fault trials of ``tests/test_faults.py`` and the hostile corpus of ``tests/test_hostile.py`` with the
full numbers (``--quick``: the CI numbers) against real processes, a real S3-compatible server (moto_server
on 127.0.0.1), a real tmpfs (when this machine lets us mount one) and real SIGKILLs, then prints a table:
trials run, faults injected by kind, checkpoints lost, corrupt loads, undetected damage. Exits non-zero if
any of the last three is not zero.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from conftest import S3Server, _free_port, start_moto  # noqa: E402
from faultharness import crash_trials_local, crash_trials_s3, crash_trials_tiers, flaky_saves  # noqa: E402

BAD = ("checkpoints lost", "corrupt loads", "undetected damage", "reported saved but missing", "phantom",
       "leftovers", "hostile cases that broke a promise", "restarts that did not", "kept checkpoints not uploaded")


def start_server() -> tuple[subprocess.Popen[bytes], S3Server]:
    port = _free_port()
    try:
        return start_moto(port), S3Server(f"http://127.0.0.1:{port}")
    except RuntimeError as e:
        sys.exit(str(e))


def section(title: str, figures: Counter[str] | dict[str, int], secs: float) -> None:
    print(f"\n## {title}  ({secs:.0f} s)")
    for k in sorted(figures, key=lambda k: (not k.startswith(("trials", "saves", "cases")), k)):
        mark = "  <-- must be 0" if k.startswith(BAD) else ""
        print(f"  {k:<78} {figures[k]:>7}{mark}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the CI numbers instead of the full ones")
    args = ap.parse_args()
    n_crash, n_flaky = (40, 20) if args.quick else (200, 100)
    totals: Counter[str] = Counter()
    moto, server = start_server()
    work = Path(tempfile.mkdtemp(prefix="autockpt-reliability-"))
    try:
        import pytest
        from test_faults import out_of_space_sweep, real_out_of_space
        from test_hostile import build_corpus, judge, run_corpus

        t = time.time()
        f = crash_trials_local(work, n_crash, seed=1)
        section("SIGKILL during saves, local directory", f, time.time() - t)
        totals.update(f)

        t = time.time()
        f = crash_trials_s3(server.endpoint, server.new_bucket, n_crash, seed=2)
        section("SIGKILL during saves, S3 (moto_server), at the N-th HTTP request", f, time.time() - t)
        totals.update(f)

        t = time.time()
        f = crash_trials_tiers(server.endpoint, server.new_bucket, work, rounds=1 if args.quick else 2,
                               phases=1 if args.quick else None, seed=4)
        section("SIGKILL during tiered uploads (local_dir + S3), at each phase of an upload", f, time.time() - t)
        totals.update(f)

        t = time.time()
        space: dict[str, int] = dict(out_of_space_sweep())
        try:
            space.update(real_out_of_space(work))
        except pytest.skip.Exception as e:
            print(f"(real tmpfs skipped: {e})")
        section("Out of space (each save's write operations, both failure policies; real tmpfs)", space,
                time.time() - t)
        totals.update(space)

        t = time.time()
        f = flaky_saves(server.endpoint, server.new_bucket, n_flaky, rate=0.10, seed=3)
        section("Saves through a proxy failing 10% of S3 requests", f, time.time() - t)
        totals.update({k: v for k, v in f.items() if k.startswith(("fault", "saves", "corrupt", "reported"))})

        t = time.time()
        cases = build_corpus(work / "hostile")
        results = run_corpus(cases, work / "hostile")
        hostile: Counter[str] = Counter()
        hostile["cases (damaged or hostile checkpoints)"] = len(results)
        for r in results:
            kind = re.sub(r"tensors-\d+-of-\d+\.safetensors", "a payload file", r["kind"])
            hostile[f"damage: {kind.split(' at byte')[0].split(' to ')[0].split(' = ')[0]}"] += 1
            if r["load"] == "ok" and not r["kind"].startswith("consistent forgery"):
                hostile["undetected damage"] += 1
            if judge(r):
                hostile["hostile cases that broke a promise"] += 1
                print("  BROKEN:", r["kind"], judge(r))
            hostile["corrupt loads"] += int(bool(r.get("restored_is_step2")) and r["restored"] == 2)
        hostile["code executed from a pickle"] = sum(r["code_executed"] for r in results)
        hostile["paths touched outside the checkpoint directory"] = sum(len(r["touched_outside"]) for r in results)
        section("Damaged and hostile checkpoints (281 kinds of damage, one subprocess, RLIMIT_AS capped)",
                hostile, time.time() - t)
        totals.update({k: v for k, v in hostile.items() if not k.startswith("damage:")})
    finally:
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    print("\n## Summary")
    trials = (totals["trials"] + totals["ENOSPC injected (fsspec wrapper)"] + totals["ENOSPC hit on a real 4 MiB tmpfs"]
              + totals["saves attempted"] + totals["cases (damaged or hostile checkpoints)"])
    print(f"  {'trials run (crashes, ENOSPC, flaky saves, hostile checkpoints)':<78} {trials:>7}")
    print(f"  {'SIGKILLs':<78} {totals['trials']:>7}")
    print(f"  {'ENOSPC injected':<78} "
          f"{totals['ENOSPC injected (fsspec wrapper)'] + totals['ENOSPC hit on a real 4 MiB tmpfs']:>7}")
    print(f"  {'S3 request faults injected (500, 503, dropped, timed out)':<78} {totals['faults']:>7}")
    print(f"  {'damaged or hostile checkpoints':<78} {totals['cases (damaged or hostile checkpoints)']:>7}")
    lost = totals["checkpoints lost"] + totals["reported saved but missing (checkpoints lost)"]
    bad = {"checkpoints lost": lost + totals["kept checkpoints not uploaded in the end"],
           "corrupt loads": totals["corrupt loads"],
           "undetected damage": totals["undetected damage"],
           "other broken promises": totals["hostile cases that broke a promise"] + totals["leftovers after restart"]
           + totals["phantom checkpoints (committed, never reported, not the one in flight)"]
           + totals["restarts that did not restore the newest checkpoint"]
           + totals["code executed from a pickle"] + totals["paths touched outside the checkpoint directory"]}
    for k, v in bad.items():
        print(f"  {k:<78} {v:>7}  <-- must be 0")
    return 1 if any(bad.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
