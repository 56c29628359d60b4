"""One rank of a gloo process group on the CPU, running one scenario of tests/test_distributed.py.

Usage: RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python dist_worker.py SCENARIO OUT CKPT [ARG]
Writes OUT/result-<rank>.json with what this rank saw; the test compares the ranks' results.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import signal
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import autockpt
from autockpt.errors import AutockptError
from autockpt.integrations import torch_distributed as td
from autockpt.preemption import PreemptionWatcher
from autockpt.storage import CheckpointWriter

SCENARIO, OUT, CKPT = sys.argv[1], sys.argv[2], sys.argv[3]
ARG = sys.argv[4] if len(sys.argv) > 4 else ""
RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
result: dict[str, Any] = {"rank": RANK, "world": WORLD}


def done() -> None:
    with open(os.path.join(OUT, f"result-{RANK}.json"), "w") as f:
        json.dump(result, f)


def error_of(fn: Any) -> dict[str, Any] | None:
    t0 = time.monotonic()
    try:
        fn()
    except AutockptError as e:
        return {"type": type(e).__name__, "message": str(e), "secs": time.monotonic() - t0,
                "failed_ranks": sorted(getattr(e, "failures", None) or {})}
    return None


def ddp_model(seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train(model: Any, opt: Any, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed * 100 + RANK)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, model.module.in_features if hasattr(model, "module") else 8, generator=g)
        model(x).pow(2).sum().backward()
        opt.step()


def fsdp_model(seed: int) -> tuple[Any, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 7), torch.nn.Linear(7, 5))  # uneven shards on 4 ranks
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt


def full(model: Any, opt: Any) -> dict[str, Any]:
    """Every parameter and Adam moment as full (unsharded) nested lists; collective."""
    out = {f"p/{n}": p.full_tensor().tolist() for n, p in model.named_parameters()}
    for i, st in opt.state_dict()["state"].items():
        out[f"exp_avg/{i}"] = st["exp_avg"].full_tensor().tolist()
        out[f"step/{i}"] = float(st["step"])
    return out


def tiers_state(seed: int) -> dict[str, Any]:
    """A replicated model (written by rank 0 only) and a tensor of each rank's own (written by that rank)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 5)
    return {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            "mine": autockpt.PerRank(torch.full((4,), float(seed * 10 + RANK)))}


def tiers_train(state: dict[str, Any], step: int) -> None:
    model, opt = state["model"], state["opt"]
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))  # the same on every rank: replicated
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()
    state["mine"].value += step


def tiers_plain(state: dict[str, Any]) -> dict[str, Any]:
    out = {k: v.tolist() for k, v in state["model"].state_dict().items()}
    out["momentum"] = [st["momentum_buffer"].tolist() for st in state["opt"].state_dict()["state"].values()]
    out["mine"] = state["mine"].value.tolist()
    return out


class DyingFile:
    """A file that SIGKILLs its own process after the first write: a rank killed in the middle of a save."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, data: Any) -> int:
        n = self.f.write(data)
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        return int(n)


def inject(kind: str) -> None:
    """Make this rank's payload writes fail (an OSError) or kill the rank mid-write."""
    real = CheckpointWriter.open

    def broken(self: Any, name: str) -> Any:
        if kind == "oserror":
            raise OSError(28, "No space left on device (injected on this rank)")
        import contextlib

        @contextlib.contextmanager
        def cm() -> Any:
            with real(self, name) as f:
                yield DyingFile(f)

        return cm()

    CheckpointWriter.open = broken  # type: ignore[method-assign]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def draws() -> dict[str, list[float]]:
    return {"python": [random.random() for _ in range(3)], "numpy": np.random.rand(3).tolist(),
            "torch": torch.rand(3).tolist()}


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    try:
        run()
    finally:
        done()
        dist.destroy_process_group()


def run() -> None:
    if SCENARIO == "ddp":
        model, opt = ddp_model(0)
        with autockpt.CheckpointManager(CKPT, max_to_keep=None, dedup=False) as mgr:
            for step in range(1, 4):
                train(model, opt, 1, step)
                result.setdefault("saved", []).append(mgr.save(step, {"model": model, "opt": opt}))
        result["weights"] = model.module.weight.tolist()
        model2, opt2 = ddp_model(1)
        result["fresh"] = model2.module.weight.tolist()
        with autockpt.CheckpointManager(CKPT) as mgr:
            result["latest"] = mgr.latest_step
            result["restored"] = mgr.restore({"model": model2, "opt": opt2})
        result["weights_after"] = model2.module.weight.tolist()
        result["momentum_equal"] = all(
            torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
            for p, q in zip(model.parameters(), model2.parameters(), strict=True)
        )
    elif SCENARIO == "fsdp_save":
        model, opt = fsdp_model(0)
        train(model, opt, 2, 1)
        with autockpt.CheckpointManager(CKPT, dedup=False) as mgr:
            mgr.save(2, {"model": model, "opt": opt})
        result["full"] = full(model, opt)
    elif SCENARIO == "fsdp_restore":  # restore into another world size; then save again into ARG
        model, opt = fsdp_model(7)
        train(model, opt, 1, 9)  # the optimizer state must exist (its DTensors give the layout to read into)
        result["fresh"] = full(model, opt)
        with autockpt.CheckpointManager(CKPT) as mgr:
            result["restored"] = mgr.restore({"model": model, "opt": opt})
        result["full"] = full(model, opt)
        if ARG:  # in the background (async_save): staged shards, the save protocol in the writer thread
            with autockpt.CheckpointManager(ARG, async_save=True, dedup=False) as mgr:
                mgr.save(2, {"model": model, "opt": opt})
    elif SCENARIO == "preempt":
        model, opt = ddp_model(0)
        with autockpt.CheckpointManager(CKPT, save_interval_steps=10**6) as mgr, PreemptionWatcher() as watcher:
            for step in range(1, 3000):
                train(model, opt, 1, step)
                if step == 5:
                    with open(os.path.join(OUT, f"ready-{RANK}"), "w") as f:
                        f.write(str(os.getpid()))
                time.sleep(0.02)
                stop = td.any_rank(watcher.triggered)
                mgr.save(step, {"model": model, "opt": opt}, force=stop)
                if stop:
                    result["stopped_at"] = step
                    break
            result["received"] = watcher.received
            result["all_steps"] = mgr.all_steps()
    elif SCENARIO == "resume_loop":  # autockpt.resume under a process group; ARG: the number of steps
        model, opt = ddp_model(0)
        with autockpt.resume(CKPT, model=model, optimizer=opt, every_n_steps=10**6) as run:
            result["started_at"] = run.step
            for step in run.steps(int(ARG)):
                train(model, opt, 1, step + 1)
                if step == 5:
                    with open(os.path.join(OUT, f"ready-{RANK}"), "w") as f:
                        f.write(str(os.getpid()))
                time.sleep(0.02)
        result.update(step=run.step, preempted=run.preempted, exit_code=run.exit_code, finished=run.finished,
                      weight=model.module.weight.detach().tolist(), all_steps=run.manager.all_steps())
    elif SCENARIO == "fail_one":  # ARG: the rank whose writes fail (sharded state: every rank writes)
        model, opt = fsdp_model(0)
        train(model, opt, 1, 1)
        # max_consecutive_failures=1: the failure is raised (the default would warn and return False on all ranks)
        with autockpt.CheckpointManager(CKPT, max_to_keep=None, max_consecutive_failures=1, dedup=False) as mgr:
            mgr.save(1, {"model": model, "opt": opt})
            train(model, opt, 1, 2)
            real = CheckpointWriter.open
            if RANK == int(ARG):
                inject("oserror")
            result["error"] = error_of(lambda: mgr.save(2, {"model": model, "opt": opt}))
            CheckpointWriter.open = real  # type: ignore[method-assign]
            result["saved_after"] = mgr.save(3, {"model": model, "opt": opt})
            result["all_steps"] = mgr.all_steps()
    elif SCENARIO == "kill_one":  # ARG: the rank SIGKILLed in the middle of writing step 2
        model, opt = fsdp_model(0)
        train(model, opt, 1, 1)
        with autockpt.CheckpointManager(CKPT, max_to_keep=None, max_consecutive_failures=1, dedup=False) as mgr:
            mgr.save(1, {"model": model, "opt": opt})
            result["full_1"] = full(model, opt)
            train(model, opt, 1, 2)
            if RANK == int(ARG):
                inject("kill")
            result["error"] = error_of(lambda: mgr.save(2, {"model": model, "opt": opt}))
    elif SCENARIO == "resume":
        model, opt = fsdp_model(5)
        train(model, opt, 1, 5)
        with autockpt.CheckpointManager(CKPT) as mgr:
            result["all_steps"] = mgr.all_steps()
            result["restored"] = mgr.restore({"model": model, "opt": opt})
        result["full"] = full(model, opt)
    elif SCENARIO == "s3":  # an object store: no rename; rank files go straight to the step directory
        opts = json.loads(os.environ["AUTOCKPT_TEST_STORAGE_OPTIONS"])
        model, opt = fsdp_model(0)
        train(model, opt, 2, 1)
        with autockpt.CheckpointManager(CKPT, storage_options=opts, dedup=False) as mgr:
            mgr.save(2, {"model": model, "opt": opt})
        result["full"] = full(model, opt)
        model2, opt2 = fsdp_model(3)
        train(model2, opt2, 1, 3)
        with autockpt.CheckpointManager(CKPT, storage_options=opts) as mgr:
            result["restored"] = mgr.restore({"model": model2, "opt": opt2})
        result["full_after"] = full(model2, opt2)
    elif SCENARIO == "rng_save":  # every rank seeds its own generators, saves them (step 1), then draws
        seed_all(50 + RANK)
        with autockpt.CheckpointManager(CKPT) as mgr:
            mgr.save(1, {"rng": autockpt.PerRank(autockpt.RNGState())})
        result["draws"] = draws()
    elif SCENARIO == "rng_restore":  # restore on this world size (maybe another) twice, drawing after each
        for name in ("draws", "again"):
            seed_all(999)
            with autockpt.CheckpointManager(CKPT) as mgr:
                mgr.restore({"rng": autockpt.PerRank(autockpt.RNGState())})
            result[name] = draws()
    elif SCENARIO == "hang":  # rank 1 never reaches the second save; rank 0 must learn which rank is missing
        with autockpt.CheckpointManager(CKPT, rank_timeout=3) as mgr:
            mgr.save(1, {"x": torch.zeros(2)})
            if RANK == 1:
                while not os.path.exists(os.path.join(OUT, "result-0.json")):
                    time.sleep(0.1)
                os._exit(0)
            result["error"] = error_of(lambda: mgr.save(2, {"x": torch.zeros(2)}))
    elif SCENARIO == "resume_hang":  # autockpt.resume: rank 1 hangs in its loop body after step 2's update
        model, opt = ddp_model(0)

        def loop() -> None:
            with autockpt.resume(CKPT, model=model, optimizer=opt, every_n_steps=10**6, rank_timeout=3) as run:
                for step in run.steps(10):
                    train(model, opt, 1, step + 1)
                    result["trained"] = step + 1
                    if RANK == 1 and step == 1:
                        while not os.path.exists(os.path.join(OUT, "result-0.json")):
                            time.sleep(0.1)
                        os._exit(0)

        result["error"] = error_of(loop)
    elif SCENARIO == "tiers_save":  # ARG: the parent of the ranks' local dirs; steps 1..3, each waited for
        opts = json.loads(os.environ["AUTOCKPT_TEST_STORAGE_OPTIONS"])
        mgr = autockpt.CheckpointManager(CKPT, storage_options=opts, local_dir=os.path.join(ARG, f"rank{RANK}"),
                                         max_to_keep=None, rank_timeout=1)
        state = tiers_state(0)
        for step in (1, 2, 3):
            tiers_train(state, step)
            mgr.save(step, state)
            result[f"state_{step}"] = tiers_plain(state)
            result["durable"] = mgr.durable_step
            result["error"] = error_of(lambda: mgr.wait_until_finished(timeout=60))  # rank 1 dies in step 3's
        result["durable_after"] = mgr.durable_step
        result["close_error"] = error_of(mgr.close)
    elif SCENARIO == "tiers_resume":  # restore on 2 ranks with local dirs, then wait for the backlog
        opts = json.loads(os.environ["AUTOCKPT_TEST_STORAGE_OPTIONS"])
        state = tiers_state(7)
        with autockpt.CheckpointManager(CKPT, storage_options=opts, local_dir=os.path.join(ARG, f"rank{RANK}"),
                                        max_to_keep=None, rank_timeout=10) as mgr:
            result["restored"] = mgr.restore(state)
            result["state"] = tiers_plain(state)
            result["finished"] = mgr.wait_until_finished(timeout=60)
            result["durable"] = mgr.durable_step
    elif SCENARIO == "dedup_shards":  # a frozen sharded backbone, a trained head: each rank dedups its shards
        backbone, frozen_opt = fsdp_model(0)
        head, opt = fsdp_model(1)
        with autockpt.CheckpointManager(CKPT, max_to_keep=None) as mgr:
            for step in (1, 2, 3):
                train(head, opt, 1, step)
                mgr.save(step, {"backbone": backbone, "head": head, "opt": opt})
        result["full"] = {"backbone": full(backbone, frozen_opt), "head": full(head, opt)}
        backbone2, frozen_opt2 = fsdp_model(5)
        head2, opt2 = fsdp_model(6)
        train(head2, opt2, 1, 9)
        with autockpt.CheckpointManager(CKPT) as mgr:
            result["restored"] = mgr.restore({"backbone": backbone2, "head": head2, "opt": opt2})
        result["full_after"] = {"backbone": full(backbone2, frozen_opt2), "head": full(head2, opt2)}
    elif SCENARIO == "unshared":
        result["error"] = error_of(lambda: autockpt.CheckpointManager(os.path.join(CKPT, f"rank{RANK}")))
    else:
        raise SystemExit(f"unknown scenario {SCENARIO}")


if __name__ == "__main__":
    main()
