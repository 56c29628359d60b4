"""autockpt demo: a plain PyTorch loop that is preempted, crashes, resumes, and ends bit-identical.

    python examples/demo.py            # the whole demo (about half a minute on 2 CPU cores)

It trains a small model three ways, each in its own process, and compares:
  1. uninterrupted, start to finish;
  2. preempted: the training process sends itself SIGTERM mid-epoch (what a cloud or SLURM does before it
     takes the machine away), saves the step it was on and exits 143; it is restarted, killed with SIGKILL
     (a crash: no chance to save), restarted, preempted again inside the same epoch, and restarted until done.
Then it checks that every per-step loss and the final parameters are the same, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOTAL_STEPS, BATCH, SAMPLES = 48, 8, 128  # 16 batches per epoch, 3 epochs


def train(ckpt: str, log: str, params: str, preempt_at: int | None) -> int:
    """The training job: an ordinary PyTorch loop plus three autockpt lines (marked)."""
    import numpy as np
    import torch

    import autockpt

    torch.manual_seed(0)  # the run's seeds; on resume, autockpt restores the generators' states after them
    np.random.seed(0)
    random.seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = (x @ torch.randn(8, 1, generator=g)).tanh() + 0.05 * torch.randn(SAMPLES, 1, generator=g)
    dataset = torch.utils.data.TensorDataset(torch.arange(SAMPLES), x, y)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL_STEPS)
    loader = autockpt.ResumableLoader(dataset, batch_size=BATCH, shuffle=True, seed=0, num_workers=2)

    with autockpt.resume(ckpt, model=model, optimizer=opt, scheduler=sched, data=loader,    # <- autockpt
                         every_n_steps=5, max_to_keep=2) as run:
        where = f"step {run.step} (epoch {loader.epoch}, batch {loader.batches})"
        print(f"    [train pid {os.getpid()}] {'resumed at ' + where if run.restored else 'fresh start'}", flush=True)
        batches = run.batches(loader)
        for step in run.steps(TOTAL_STEPS):                                                  # <- autockpt
            _, xb, yb = next(batches)
            xb = xb + 0.01 * torch.from_numpy(np.random.normal(size=tuple(xb.shape))).float()  # numpy RNG too
            xb = xb * random.uniform(0.95, 1.05)  # and Python's
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            with open(log, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item().hex()}) + "\n")
            print(f"step {step} loss {loss.item():.5f}", flush=True)
            run.log(loss=loss.item())                                                        # <- autockpt
            if step == preempt_at:
                os.kill(os.getpid(), signal.SIGTERM)  # the "preemption notice"; the step still finishes
            time.sleep(0.01)  # pretend each step is real work
    if run.preempted:
        print(f"    [train] {signal.Signals(run.signal or 0).name}: saved step {run.step}, exiting {run.exit_code}",
              flush=True)
    if run.finished:
        with open(params, "w") as f:
            f.write(torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes().hex())
    return run.exit_code


def _launch(d: Path, preempt_at: int | None = None, kill_at: int | None = None) -> tuple[int, int | None]:
    """Run the job; SIGKILL it when it reaches step ``kill_at``. Returns (exit code, last step it began)."""
    cmd = [sys.executable, __file__, "--child", str(d / "ckpt"), str(d / "losses.jsonl"), str(d / "params.hex")]
    if preempt_at is not None:
        cmd += ["--preempt-at", str(preempt_at)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    last = None
    for line in p.stdout:
        if line.startswith("step "):
            last = int(line.split()[1])
            if kill_at is not None and last >= kill_at:
                os.kill(p.pid, signal.SIGKILL)
                print(f"    [demo] SIGKILL during step {last} (a crash: nothing is saved)", flush=True)
                break
        else:
            print(line, end="", flush=True)
    p.wait()
    return p.returncode, last


def _results(d: Path) -> tuple[dict[int, set[str]], str]:
    losses: dict[int, set[str]] = {}
    for line in (d / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses.setdefault(rec["step"], set()).add(rec["loss"])
    return losses, (d / "params.hex").read_text()


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (sys.path[0], os.environ.get("PYTHONPATH")) if p)
    import autockpt

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="autockpt-demo-"))
    per_epoch = SAMPLES // BATCH
    try:
        ref, run = work / "uninterrupted", work / "interrupted"
        ref.mkdir()
        run.mkdir()
        print(f"1) Uninterrupted run: {TOTAL_STEPS} steps, {per_epoch} batches per epoch")
        rc, _ = _launch(ref)
        assert rc == 0, f"the uninterrupted run failed with exit code {rc}"

        rnd = random.Random()
        first = per_epoch + rnd.randint(1, 4)             # inside epoch 1
        second = first + rnd.randint(4, 7)                # later in the same epoch
        kill = rnd.randint(first + 1, second - 1)
        print(f"\n2) Interrupted run: preempt at step {first}, crash at step {kill}, preempt at step {second}")
        for label, kw in (("preemption", {"preempt_at": first}), ("crash", {"kill_at": kill}),
                          ("preemption", {"preempt_at": second}), ("rest", {})):
            rc, last = _launch(run, **kw)
            latest = autockpt.CheckpointManager(run / "ckpt").latest_step
            if label == "preemption":
                assert rc == 143, f"expected exit code 143 after SIGTERM, got {rc}"
                assert latest == last + 1, f"SIGTERM came in step {last}, but the newest checkpoint is {latest}"
                print(f"    [demo] exit code {rc}; newest checkpoint: step {latest} "
                      f"(no step lost: step {last} was running when the signal came); restarting")
            elif label == "crash":
                print(f"    [demo] newest checkpoint: step {latest}; restarting (steps after it are redone)")
            else:
                assert rc == 0, f"the last restart failed with exit code {rc}"

        print("\n3) Comparing")
        a_losses, a_params = _results(ref)
        b_losses, b_params = _results(run)
        same_losses = sorted(a_losses) == sorted(b_losses) == list(range(TOTAL_STEPS)) and all(
            b_losses[s] == a_losses[s] for s in a_losses  # redone steps included: one distinct value per step
        )
        same_params = a_params == b_params
        print(f"    per-step losses ({TOTAL_STEPS} steps): {'identical, bit for bit' if same_losses else 'DIFFERENT'}")
        print(f"    final parameters ({len(a_params) // 8} floats): "
              f"{'identical, bit for bit' if same_params else 'DIFFERENT'}")
        ok = same_losses and same_params
        print(f"\n{'PASS' if ok else 'FAIL'}: the preempted and crashed run "
              f"{'matches' if ok else 'does NOT match'} the uninterrupted one ({time.time() - t0:.0f} s)")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("CKPT", "LOG", "PARAMS"), help=argparse.SUPPRESS)
    ap.add_argument("--preempt-at", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        sys.exit(train(*a.child, preempt_at=a.preempt_at))
    sys.exit(main())
