"""autockpt against the alternatives, measured in one run, contenders alternating, medians and ratios.

    bash scripts/bench.sh            # set-up + this script with its defaults; results in benchmarks/results/
    .venv/bin/python benchmarks/run.py --repeats 3 --gib 1.0 --quick

Sections (each a table in benchmarks/results/RESULTS.md, plus benchmarks/results/chart.png):
1. durable sync save of a large-tensor state (64 tensors) and a small-tensor state (20,000 tensors)
2. training stall per checkpoint: async save() vs a bare clone() vs torch.distributed.checkpoint.async_save
3. restore into existing tensors, with peak extra memory (each in a fresh process)
4. end-to-end: a training loop checkpointing every 20 steps vs the same loop without checkpoints
5. S3 (a local moto server): save throughput vs a raw s3fs pipe of the same bytes
Timings are noisy on a shared 2-core machine: read the ratios, which are measured side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import autockpt

HERE = Path(__file__).parent
RESULTS = HERE / "results"
MiB = 2**20


def fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(contenders: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Run every contender once per round, rounds repeated; the median of each."""
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


def table(title: str, medians: dict[str, float], baseline: str, unit: str = "s",
          extra: dict[str, str] | None = None) -> str:
    head = f"| contender | median ({unit}) | ratio to {baseline} |" + (" note |" if extra else "")
    lines = [f"### {title}", "", head, "|---|---|---|" + ("---|" if extra else "")]
    for k, v in medians.items():
        note = f" {extra.get(k, '')} |" if extra else ""
        lines.append(f"| {k} | {v:.3f} | {v / medians[baseline]:.2f} |{note}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ 1. sync save
def bench_sync_save(state: dict[str, torch.Tensor], work: Path, repeats: int) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    def fresh(name: str) -> Path:
        p = work / name
        shutil.rmtree(p, ignore_errors=True)
        return p

    def raw() -> float:
        p = fresh("raw")
        p.mkdir()

        def go() -> None:
            with open(p / "raw.bin", "wb") as f:
                for v in state.values():
                    f.write(memoryview(v.numpy()).cast("B"))
                f.flush()
                os.fsync(f.fileno())
        return timed(go)

    def tsave() -> float:
        p = fresh("torch")
        p.mkdir()

        def go() -> None:
            with open(p / "state.pt", "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        return timed(go)

    def st() -> float:
        p = fresh("st")
        p.mkdir()

        def go() -> None:
            save_file(state, str(p / "m.safetensors"))
            fsync_tree(str(p))
        return timed(go)

    def dcp_save() -> float:
        p = fresh("dcp")

        def go() -> None:
            dcp.save(state, checkpoint_id=str(p))
            fsync_tree(str(p))
        return timed(go)

    def ours() -> float:
        p = fresh("ours")
        mgr = autockpt.CheckpointManager(p, max_to_keep=1)
        t = timed(lambda: mgr.save(1, state))
        mgr.close()
        return t

    return alternate({"raw write+fsync": raw, "autockpt": ours, "torch.save": tsave,
                      "safetensors.save_file": st, "dcp.save": dcp_save}, repeats)


# ------------------------------------------------------------------------------------------ 2. stall
def bench_stall(state: dict[str, torch.Tensor], work: Path, repeats: int) -> tuple[dict[str, float], str]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    note = ""
    if not dist.is_initialized():
        store = dist.FileStore(str(work / "pgstore"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    shutil.rmtree(work / "async", ignore_errors=True)
    mgr = autockpt.CheckpointManager(work / "async", max_to_keep=1, async_save=True)
    step = [0]

    def ours_call() -> float:
        step[0] += 1
        t = timed(lambda: mgr.save(step[0], state))
        mgr.wait_until_finished()
        return t

    first = ours_call()
    # what a training loop gets: save() is called every step and is due every 20th, so the staging buffers
    # are allocated in the background at the first call that is not due (or at the restore of a resume)
    ahead = autockpt.CheckpointManager(work / "async_ahead", max_to_keep=1, async_save=True, save_interval_steps=2)
    ahead.save(1, state)  # not due: stages ahead
    if ahead._background._preparing is not None:  # the loop's next steps would run meanwhile
        ahead._background._preparing.join()
    first_ahead = timed(lambda: ahead.save(2, state))
    ahead.close()
    kept = []  # the first clone gets fresh pages (as a cold first save does); later ones reuse freed memory
    first_clone = timed(lambda: kept.append({k: v.clone() for k, v in state.items()}))
    kept.clear()
    clone = alternate({"clone()": lambda: timed(lambda: {k: v.clone() for k, v in state.items()})}, repeats)
    later = alternate({"autockpt async save() (2nd+)": ours_call}, repeats)
    futures = []

    def dcp_async() -> float:
        p = work / f"dcp_async{len(futures)}"
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=str(p))
        t = time.perf_counter() - t0
        fut.result()
        futures.append(fut)
        return t

    try:
        dcp_med = alternate({"dcp.async_save": dcp_async}, repeats)
    except Exception as e:  # pragma: no cover - depends on the torch build
        dcp_med, note = {}, f"dcp.async_save failed here: {e!r}"
    mgr.close()
    dist.destroy_process_group()  # the rest of the benchmark runs without a process group
    for p in list(work.iterdir()):
        if p.name.startswith(("dcp_async", "async")):
            shutil.rmtree(p, ignore_errors=True)

    def sync_save() -> float:
        d = work / "sync"
        shutil.rmtree(d, ignore_errors=True)
        return timed(lambda: autockpt.CheckpointManager(d, max_to_keep=1).save(1, state))

    sync = alternate({"autockpt sync save()": sync_save}, max(1, repeats // 2))
    shutil.rmtree(work / "sync", ignore_errors=True)
    return {"clone()": clone["clone()"], "clone() (1st, fresh pages)": first_clone,
            "autockpt async save() (1st, cold)": first,
            "autockpt async save() (1st, staged ahead)": first_ahead, **later, **dcp_med, **sync}, note


# ------------------------------------------------------------------------------------------ 3. restore
RESTORE_CHILD = r"""
import json, os, resource, sys, time, torch, autockpt
from safetensors.torch import load_file
kind, work, n, numel = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = torch.nn.Module()
for i in range(n):
    model.register_buffer(f"w{i}", torch.full((numel,), -1.0))  # touched: counted in the baseline RSS
def hwm():  # this process's peak RSS in KiB (ru_maxrss would carry the parent's peak across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
base = hwm()
t = time.perf_counter()
if kind == "autockpt":
    autockpt.CheckpointManager(os.path.join(work, "ours")).restore({"model": model})
elif kind == "torch.load":
    model.load_state_dict(torch.load(os.path.join(work, "restore.pt")))
else:
    model.load_state_dict(load_file(os.path.join(work, "restore.safetensors")))
dt = time.perf_counter() - t
peak = hwm()
ok = all(bool((getattr(model, f"w{i}")[:4] == i).all()) for i in range(n))
print(json.dumps({"seconds": dt, "extra_mib": (peak - base) / 1024, "ok": ok}))
"""


def bench_restore(n: int, numel: int, work: Path, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    from safetensors.torch import save_file

    state = {f"w{i}": torch.full((numel,), float(i)) for i in range(n)}
    shutil.rmtree(work / "ours", ignore_errors=True)
    with autockpt.CheckpointManager(work / "ours") as mgr:
        mgr.save(1, {"model": state})
    torch.save(state, work / "restore.pt")
    save_file(state, str(work / "restore.safetensors"))
    del state
    secs: dict[str, list[float]] = {}
    mem: dict[str, list[float]] = {}
    for _ in range(repeats):
        for kind in ("torch.load", "autockpt", "safetensors.load_file"):
            out = subprocess.run([sys.executable, "-c", RESTORE_CHILD, kind, str(work), str(n), str(numel)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"restore with {kind} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["ok"], kind
            secs.setdefault(kind, []).append(r["seconds"])
            mem.setdefault(kind, []).append(r["extra_mib"])
    return ({k: statistics.median(v) for k, v in secs.items()}, {k: statistics.median(v) for k, v in mem.items()})


# ------------------------------------------------------------------------------------------ 4. end to end
def bench_end_to_end(work: Path, steps: int, every: int, width: int, rounds: int = 2
                     ) -> tuple[dict[str, float], dict[str, str]]:
    """Wall time of a training loop that saves every ``every`` steps (the last save at the last step, which
    ``close()`` waits for), against the same loop without checkpoints; ``rounds`` alternating rounds, medians.

    Beside each wall time, the steady-state cost of one save, measured inside the same loop: what ``save()``
    blocked, plus the extra time of the steps that ran while a background write was in flight, over the median
    step with none in flight (the wall-time differences between loops scatter by several % on a shared machine;
    this pairing does not)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(width, width) for _ in range(4)]
    model = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(64, width)
    per_save: dict[str, list[float]] = {}

    def loop(name: str, save: Callable[[int], Any] | None, in_flight: Callable[[], bool] = lambda: False) -> float:
        busy, idle, blocked = [], [], 0.0
        t = time.perf_counter()
        for s in range(1, steps + 1):
            flying = in_flight()
            a = time.perf_counter()
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            b = time.perf_counter()
            (busy if flying else idle).append(b - a)
            if save is not None and s % every == 0:
                save(s)
                blocked += time.perf_counter() - b if s < steps else 0.0
        wall = time.perf_counter() - t
        if save is not None and idle and steps >= 2 * every:
            base = statistics.median(idle)
            saves = max(1, steps // every - 1)  # the last save is not in the steady state
            cost = (blocked + sum(d - base for d in busy)) / saves
            per_save.setdefault(name, []).append(100 * cost / (every * base))
        return wall

    results: dict[str, list[float]] = {}
    for rnd in range(rounds):
        results.setdefault("no checkpoints", []).append(loop("none", None))
        for kind in ("async", "sync"):
            d = work / f"e2e{rnd}"
            mgr = autockpt.CheckpointManager(d, max_to_keep=2, async_save=kind == "async")
            name = f"autockpt {kind}"

            def flying(mgr: autockpt.CheckpointManager = mgr) -> bool:
                th = mgr._background._thread
                return th is not None and th.is_alive()

            results.setdefault(name, []).append(
                loop(name, lambda s, mgr=mgr: mgr.save(s, {"model": model, "opt": opt}), flying) + timed(mgr.close))
            shutil.rmtree(d, ignore_errors=True)

        def tsave(s: int, d: Path = work / f"e2e_torch{rnd}") -> None:
            d.mkdir(exist_ok=True)
            with open(d / f"{s}.pt", "wb") as f:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
        results.setdefault("torch.save", []).append(loop("torch.save", tsave))
        shutil.rmtree(work / f"e2e_torch{rnd}", ignore_errors=True)
    notes = {k: f"one save in the steady state: {statistics.median(v):.1f} % of {every} steps "
                f"(rounds: {', '.join(f'{p:.1f}' for p in v)})" for k, v in per_save.items()}
    return {k: statistics.median(v) for k, v in results.items()}, notes


# ------------------------------------------------------------------------------------------ 6. frameworks
def bench_frameworks(work: Path, steps: int, every: int, width: int, rounds: int = 3,
                     frameworks: tuple[str, ...] = ("lightning", "keras")) -> dict[str, float]:
    """The same ~50M-parameter MLP trained by Lightning and by Keras: no checkpoints, the built-in, ours (sync, and
    async where the callback offers it); ``rounds`` alternating rounds, the median of each."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from autockpt.integrations.keras import AutoCheckpoint as KerasAuto
    from autockpt.integrations.lightning import AutoCheckpoint as LightningAuto

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(width, width),
                                                                            torch.nn.ReLU())])

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    x = torch.randn(64 * steps, width)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)

    def lightning_fit(kind: str) -> float:
        d = work / f"pl_{kind}"
        shutil.rmtree(d, ignore_errors=True)
        cbs: list[Any] = {"none": [], "ModelCheckpoint": [ModelCheckpoint(dirpath=d, every_n_train_steps=every)],
                          "autockpt": [LightningAuto(str(d), every_n_train_steps=every, max_to_keep=2)]}[kind]
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=cbs,
                             enable_checkpointing=kind == "ModelCheckpoint", enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(d))
        torch.manual_seed(0)
        t = timed(lambda: trainer.fit(Net(), loader))
        shutil.rmtree(d, ignore_errors=True)
        return t

    xs = x.numpy()

    def keras_fit(kind: str) -> float:
        d = work / f"keras_{kind}"
        shutil.rmtree(d, ignore_errors=True)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width, activation="relu")
                                                             for _ in range(4)])
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
        cbs: list[Any] = {"none": [], "BackupAndRestore": [keras.callbacks.BackupAndRestore(str(d), save_freq=every)],
                          "autockpt": [KerasAuto(str(d), save_freq=every, max_to_keep=2)],
                          "autockpt async": [KerasAuto(str(d), save_freq=every, max_to_keep=2, async_save=True)],
                          }[kind]
        t = timed(lambda: model.fit(xs, xs, batch_size=64, epochs=1, shuffle=False, verbose=0, callbacks=cbs))
        shutil.rmtree(d, ignore_errors=True)
        return t

    contenders: dict[str, Callable[[], float]] = {}
    if "lightning" in frameworks:
        for kind in ("none", "ModelCheckpoint", "autockpt"):
            contenders[f"Lightning, {kind}"] = lambda kind=kind: lightning_fit(kind)
    if "keras" in frameworks:
        for kind in ("none", "BackupAndRestore", "autockpt", "autockpt async"):
            contenders[f"Keras, {kind}"] = lambda kind=kind: keras_fit(kind)
    return alternate(contenders, rounds)


# ------------------------------------------------------------------------------------------ 5. S3
def bench_s3(state: dict[str, torch.Tensor], work: Path, repeats: int) -> tuple[dict[str, float], float]:
    import socket

    import botocore.session
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    proc = subprocess.Popen([exe or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
        ).create_bucket(Bucket="bench")
        opts = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        fs = s3fs.S3FileSystem(**opts)
        blob = b"".join(memoryview(v.numpy()).cast("B").tobytes() for v in state.values())
        nbytes = len(blob)
        n = [0]

        def raw() -> float:
            n[0] += 1
            return timed(lambda: fs.pipe_file(f"bench/raw/{n[0]}.bin", blob))

        def ours() -> float:
            n[0] += 1
            mgr = autockpt.CheckpointManager(f"s3://bench/ours{n[0]}", storage_options=opts, max_to_keep=1)
            t = timed(lambda: mgr.save(1, state))
            mgr.close()
            return t

        med = alternate({"raw s3fs pipe_file": raw, "autockpt save to s3": ours}, repeats)
        return med, nbytes
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def chart(sections: dict[str, dict[str, float]], baselines: dict[str, str], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sections), 1, figsize=(9, 2.6 * len(sections)), squeeze=False)
    axes = axes[:, 0]
    for ax, (title, med) in zip(axes, sections.items(), strict=True):
        names = list(med)
        base = med[baselines[title]]
        colors = ["#2b8cbe" if "autockpt" in k else "#bbbbbb" for k in names]
        ax.barh(names, [med[k] / base for k in names], color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(f"{title} (ratio to {baselines[title]}, lower is better)", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gib", type=float, default=1.0, help="size of the large-tensor state")
    ap.add_argument("--small-mib", type=float, default=256, help="size of the 20,000-tensor state")
    ap.add_argument("--e2e-width", type=int, default=3584, help="4 Linear(w, w): 3584 gives ~51M parameters")
    ap.add_argument("--e2e-steps", type=int, default=60)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir on the same disk)")
    ap.add_argument("--sections", default="1,2,3,4,5,6", help="which sections to run, e.g. 3,4")
    ap.add_argument("--frameworks", default="lightning,keras", help="section 6: lightning, keras or both")
    ap.add_argument("--e2e-rounds", type=int, default=2, help="section 4: alternating rounds (medians)")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="autockpt-bench-", dir=str(HERE)))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    numel = int(args.gib * 2**30 / 4 / 64)
    large = {f"w{i}": torch.randn(numel) for i in range(64)}
    small_numel = int(args.small_mib * MiB / 4 / 20_000)
    small = {f"t{i}": torch.randn(small_numel) for i in range(20_000)}
    md = [f"# autockpt benchmarks\n\nCommand: `{' '.join([Path(sys.executable).name, *sys.argv])}`; torch "
          f"{torch.__version__}; {os.cpu_count()} CPUs; repeats {args.repeats}; medians.\n"]
    sections: dict[str, dict[str, float]] = {}
    baselines: dict[str, str] = {}
    want = set(args.sections.split(","))
    try:
        if "1" in want:
            t = f"1a. durable sync save, {args.gib:g} GiB in 64 tensors"
            sections[t] = bench_sync_save(large, work, args.repeats)
            baselines[t] = "raw write+fsync"
            md.append(table(t, sections[t], baselines[t]))
            print(md[-1], flush=True)
            t = f"1b. durable sync save, {args.small_mib:g} MiB in 20,000 tensors"
            sections[t] = bench_sync_save(small, work, args.repeats)
            baselines[t] = "raw write+fsync"
            md.append(table(t, sections[t], baselines[t]))
            print(md[-1], flush=True)
        if "2" in want:
            t = f"2. training stall per checkpoint, {args.gib:g} GiB"
            sections[t], note = bench_stall(large, work, args.repeats)
            baselines[t] = "clone()"
            md.append(table(t, sections[t], baselines[t]) + (f"\n{note}\n" if note else ""))
            print(md[-1], flush=True)
        if "3" in want:
            t = f"3. restore {args.gib:g} GiB into existing tensors"
            secs, mem = bench_restore(64, numel, work, args.repeats)
            sections[t] = secs
            baselines[t] = "torch.load"
            notes = {k: f"peak extra memory {v:.0f} MiB" for k, v in mem.items()}
            md.append(table(t, secs, baselines[t], extra=notes)
                      + f"\nLargest single tensor: {numel * 4 / MiB:.0f} MiB.\n")
            print(md[-1], flush=True)
        if "4" in want:
            t = (f"4. end to end, {args.e2e_steps} Adam steps of a 4x Linear({args.e2e_width}) model, "
                 f"checkpoint every 20, {args.e2e_rounds} rounds")
            sections[t], notes = bench_end_to_end(work, args.e2e_steps, 20, args.e2e_width, args.e2e_rounds)
            baselines[t] = "no checkpoints"
            md.append(table(t, sections[t], baselines[t], extra=notes))
            print(md[-1], flush=True)
        if "5" in want:
            t = f"5. save to S3 (moto on 127.0.0.1), {args.small_mib:g} MiB in 64 tensors"
            s3_state = {k: v[: int(args.small_mib * MiB / 4 / 64)] for k, v in large.items()}
            s3, nbytes = bench_s3(s3_state, work, args.repeats)
            sections[t] = s3
            baselines[t] = "raw s3fs pipe_file"
            md.append(table(t, s3, baselines[t], extra={k: f"{nbytes / v / 1e6:.0f} MB/s" for k, v in s3.items()}))
            print(md[-1], flush=True)
        if "6" in want:
            t = (f"6. frameworks, {args.e2e_steps} steps of a 4x Linear({args.e2e_width}) MLP + Adam, "
                 f"checkpoint every 20, {args.repeats} rounds")
            frameworks = tuple(args.frameworks.split(","))
            sections[t] = bench_frameworks(work, args.e2e_steps, 20, args.e2e_width, args.repeats, frameworks)
            baselines[t] = "Lightning, none" if "lightning" in frameworks else "Keras, none"
            base_of = {k: k.split(",")[0] + ", none" for k in sections[t]}
            over = {k: f"{100 * (v / sections[t][base_of[k]] - 1):+.1f} % vs {base_of[k]}"
                    for k, v in sections[t].items()}
            md.append(table(t, sections[t], baselines[t], extra=over))
            print(md[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        tag = "" if want == {"1", "2", "3", "4", "5", "6"} else "-s" + "".join(sorted(want))
        (RESULTS / f"RESULTS{tag}.md").write_text("\n".join(md))
        (RESULTS / f"results{tag}.json").write_text(json.dumps(sections, indent=1))
        if sections:
            chart(sections, baselines, RESULTS / f"chart{tag}.png")
    print(f"wrote {RESULTS}/RESULTS{tag}.md and chart{tag}.png; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
