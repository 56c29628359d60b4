"""autockpt.resume and the resumable data position: real subprocesses, real signals, real (tiny) training."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import autockpt
from autockpt.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train_resumable.py"
TOTAL, BATCHES_PER_EPOCH = 60, 12  # 96 samples, batch 8


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """One run of the training script; optionally sends ``sig`` once the body of step ``at`` (or later) began."""

    def __init__(self, d: Path, sig: int | None = None, at: int = 0, extra: tuple[str, ...] = ()) -> None:
        cmd = [sys.executable, str(SCRIPT), "--ckpt", str(d / "ckpt"), "--log", str(d / "losses.jsonl"),
               "--params", str(d / "params.hex"), "--signals-log", str(d / "signals.jsonl"), "--total", str(TOTAL),
               *extra]
        if sig is not None:  # steps from `at` on take longer, so that the signal lands in step `at` on a busy machine
            cmd += ["--slow-from", str(at)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        assert p.stdout is not None
        self.lines: list[str] = []
        self.signalled = False
        if sig is not None:
            for line in p.stdout:
                self.lines.append(line.strip())
                if line.startswith("step ") and int(line.split()[1]) >= at:
                    os.kill(p.pid, sig)
                    self.signalled = True
                    break
        out, err = p.communicate(timeout=180)
        self.lines += out.strip().splitlines()
        self.stderr = err
        self.returncode = p.returncode
        starts = [ln for ln in self.lines if ln.startswith("start ")]
        assert starts, f"child never started: rc={p.returncode}\n{err[-3000:]}"
        self.start = int(starts[0].split()[1])
        self.stepped = [int(ln.split()[1]) for ln in self.lines if ln.startswith("step ")]
        ex = [ln for ln in self.lines if ln.startswith("exit ")]
        self.exit = dict(kv.split("=") for kv in ex[0].split()[1:]) if ex else None


def _losses(d: Path) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for line in (d / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step.setdefault(rec["step"], []).append(rec)
    return by_step


def _latest(d: Path) -> int | None:
    return autockpt.CheckpointManager(d / "ckpt").latest_step


def _signal_records(d: Path) -> list[dict]:
    p = d / "signals.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _check_sigterm(d: Path, child: Child, n_records_before: int, double: bool = False) -> int:
    """No step lost: the checkpoint is of the step during which the signal arrived, and nothing ran past it."""
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-3000:]
    assert child.exit is not None and child.exit["preempted"] == "True"
    records = _signal_records(d)[n_records_before:]
    assert len(records) == (2 if double else 1), records  # our earlier handler ran (twice with the double TERM)
    first = records[0]
    ckpt = _latest(d)
    assert ckpt is not None and int(child.exit["latest"]) == ckpt == int(child.exit["step"])
    if first["in_body"] is not None:  # arrived while step `in_body` was running: that step is saved
        assert ckpt == first["in_body"] + 1, (first, ckpt)
    else:  # arrived between two steps (in the loop's own bookkeeping)
        assert ckpt in (first["step"], first["step"] + 1), (first, ckpt)
    assert max(child.stepped) == ckpt - 1, "a step ran after the one being saved"
    return ckpt


@pytest.mark.full
def test_interrupted_training_matches_uninterrupted_bit_for_bit(tmp_path: Path, seed: int) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    c = Child(ref)
    assert c.returncode == 0 and c.start == 0, c.stderr[-3000:]
    ref_losses = _losses(ref)
    assert sorted(ref_losses) == list(range(TOTAL))

    rnd = random.Random(seed)
    run = tmp_path / "run"
    run.mkdir()
    # KILL, TERM, TERM (the two TERMs inside one epoch), KILL, TERM with a second TERM during its save, KILL
    plan = [signal.SIGKILL, signal.SIGTERM, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]
    plan += [signal.SIGKILL] if os.environ.get("AUTOCKPT_FULL") == "1" else []  # the suite's time
    events: list[tuple[str, int, int, int]] = []  # (signal, resumed from, target, checkpoint after)
    resumed_at = 0
    for i, sig in enumerate(plan):
        if i == 1:  # first of the same-epoch pair: early in an epoch, so the second fits after it
            epoch_start = (resumed_at // BATCHES_PER_EPOCH + 1) * BATCHES_PER_EPOCH
            target = epoch_start + rnd.randint(1, 4)
        elif i == 2:  # second: later in the same epoch
            target = resumed_at + rnd.randint(1, BATCHES_PER_EPOCH - 2 - resumed_at % BATCHES_PER_EPOCH)
        else:
            target = resumed_at + rnd.randint(2, 8)
        n_rec = len(_signal_records(run))
        double = i == 4
        c = Child(run, sig, target, ("--double-term",) if double else ())
        assert c.signalled, f"seed {seed}: the run ended before step {target}"
        assert c.start == resumed_at, f"seed {seed}: resumed at {c.start}, expected {resumed_at}"
        if sig == signal.SIGKILL:
            assert c.returncode == -signal.SIGKILL
            after = _latest(run) or 0
        else:
            after = _check_sigterm(run, c, n_rec, double)
        events.append((signal.Signals(sig).name, resumed_at, target, after))
        resumed_at = after
    print(f"seed {seed}: (signal, resumed from, target step, checkpoint after): {events}")
    c = Child(run)
    assert c.returncode == 0 and c.start == resumed_at, c.stderr[-3000:]
    assert c.exit is not None and c.exit["step"] == str(TOTAL)

    term_epochs = [after // BATCHES_PER_EPOCH for name, _, _, after in events[1:3]]
    assert term_epochs[0] == term_epochs[1], (seed, events)
    assert all(after % BATCHES_PER_EPOCH for _, _, _, after in events[1:3]), (seed, events)  # mid-epoch

    losses = _losses(run)
    assert sorted(losses) == list(range(TOTAL)), (seed, events)
    for step, recs in losses.items():
        for rec in recs:  # steps re-run after a SIGKILL give the same result too
            assert rec == ref_losses[step][0], (seed, events, step, rec, ref_losses[step][0])
    assert (run / "params.hex").read_text() == (ref / "params.hex").read_text(), (seed, events)


def test_sigint_saves_at_the_step_boundary(tmp_path: Path) -> None:
    c = Child(tmp_path, signal.SIGINT, 7)
    assert c.returncode == 128 + signal.SIGINT, c.stderr[-3000:]
    assert c.exit is not None and c.exit["preempted"] == "True"
    assert _latest(tmp_path) == int(c.exit["step"]) == max(c.stepped) + 1
    c2 = Child(tmp_path)
    assert c2.returncode == 0 and c2.start == int(c.exit["step"])


# ---------------------------------------------------------------------------------------------- in-process
torch = pytest.importorskip("torch")


def _model_opt() -> tuple[object, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _train(run: autockpt.Run, model: object, opt: object, total: int, fail_at: int | None = None) -> None:
    for step in run.steps(total):
        opt.zero_grad()
        loss = model(torch.ones(2, 3)).pow(2).mean()
        loss.backward()
        opt.step()
        if step == fail_at:
            raise RuntimeError("boom")
        run.log(loss=loss.item())


def test_fresh_start_then_restore(tmp_path: Path) -> None:
    model, opt = _model_opt()
    with autockpt.resume(tmp_path, model=model, optimizer=opt, every_n_steps=4) as run:
        assert (run.step, run.restored) == (0, False)
        _train(run, model, opt, 10)
    assert run.finished and not run.preempted and run.exit_code == 0
    assert run.manager.all_steps() == [4, 8, 10]
    weights = model.weight.detach().clone()
    model2, opt2 = _model_opt()
    with autockpt.resume(tmp_path, model=model2, optimizer=opt2, every_n_steps=4) as run2:
        assert (run2.step, run2.restored) == (10, True)
        assert list(run2.steps(10)) == []
    assert torch.equal(model2.weight, weights)


def test_exception_in_the_loop_saves_nothing(tmp_path: Path) -> None:
    model, opt = _model_opt()
    with pytest.raises(RuntimeError, match="boom"):
        with autockpt.resume(tmp_path, model=model, optimizer=opt, every_n_steps=3) as run:
            _train(run, model, opt, 20, fail_at=7)  # raises after updating the weights of step 7
    assert run.manager.all_steps() == [3, 6]
    saved = autockpt.load(tmp_path)
    assert not torch.equal(saved["model"]["weight"], model.weight.detach())  # the half-finished state is not there


def test_keep_best_gets_the_logged_metrics(tmp_path: Path) -> None:
    model, opt = _model_opt()
    with autockpt.resume(tmp_path, model=model, optimizer=opt, every_n_steps=1, max_to_keep=1,
                         keep_best=autockpt.KeepBest("neg_step", mode="min")) as run:
        for step in run.steps(5):
            run.log(neg_step=float(-step if step != 2 else -100))
    assert run.manager.all_steps() == [3, 5]  # step 3 holds the metric logged in the body of step 2


def test_extra_state_and_stateful_loader_protocol(tmp_path: Path) -> None:
    class Position:  # anything with state_dict/load_state_dict, like torchdata's StatefulDataLoader
        def __init__(self) -> None:
            self.i = 0

        def state_dict(self) -> dict[str, int]:
            return {"i": self.i}

        def load_state_dict(self, s: dict[str, int]) -> None:
            self.i = s["i"]

    model, opt = _model_opt()
    pos, extra = Position(), {"count": 0}
    with autockpt.resume(tmp_path, model=model, data=pos, state={"extra": extra}, every_n_steps=2) as run:
        for _ in run.steps(6):
            pos.i += 3
            extra["count"] += 1
    pos2, extra2 = Position(), {"count": 0}
    with autockpt.resume(tmp_path, model=model, data=pos2, state={"extra": extra2}, every_n_steps=2) as run2:
        assert run2.step == 6
    assert (pos2.i, extra2["count"]) == (18, 6)


def test_bad_arguments_raise_typed_errors(tmp_path: Path) -> None:
    model, opt = _model_opt()
    bad = [
        dict(every_n_steps=0), dict(every_n_steps=2.5), dict(every_n_seconds=-1), dict(save_interval_steps=3),
        dict(max_to_keep=0), dict(state={"model": model}), dict(data=object()), dict(signals=["SIGNOPE"]),
    ]
    for kwargs in bad:
        with pytest.raises(InvalidArgumentError):
            autockpt.resume(tmp_path / "x", model=model, **kwargs)
    with pytest.raises(InvalidArgumentError, match="state_dict"):
        autockpt.resume(tmp_path / "x", model=object())
    with pytest.raises(InvalidArgumentError, match="nothing to checkpoint"):
        autockpt.resume(tmp_path / "x", rng=False)
    with autockpt.resume(tmp_path / "y", model=model) as run:
        with pytest.raises(InvalidArgumentError, match="total"):
            run.steps(-1)


def test_plain_dataloader_is_refused_with_a_warning(tmp_path: Path) -> None:
    model, _ = _model_opt()
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=2, shuffle=True)
    with pytest.warns(UserWarning, match="ResumableLoader"):
        run = autockpt.resume(tmp_path, model=model, data=loader)
    assert "data" not in run.state


def _ids(batches: list) -> list[int]:
    return [int(i) for b in batches for i in b]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_several_resumes_in_one_epoch(workers: int) -> None:
    ds = list(range(50))
    full = autockpt.ResumableLoader(ds, batch_size=4, shuffle=True, seed=3, num_workers=workers)
    epochs = [_ids(list(full)) for _ in range(3)]
    assert all(sorted(e) == ds for e in epochs) and epochs[0] != epochs[1]
    got: list[int] = []
    state, consumed = None, 0
    for cut in (2, 5, 6, 13, 15, 20, 27, 33):  # cumulative batches consumed before each "crash"; 13 per epoch
        loader = autockpt.ResumableLoader(ds, batch_size=4, shuffle=True, seed=3, num_workers=workers)
        if state is not None:
            loader.load_state_dict(state)
        it = iter(loader)
        while consumed < cut:
            try:
                got += _ids([next(it)])
                consumed += 1
            except StopIteration:
                it = iter(loader)
        state = loader.state_dict()
        del it  # the batches the workers prefetched are dropped, as in a killed process
    assert got == [i for e in epochs for i in e][: len(got)]


def test_resumable_sampler_starts_mid_epoch_without_touching_skipped_samples() -> None:
    touched: list[int] = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> int:
            touched.append(i)
            return i

    ds = Recording()
    ref = autockpt.ResumableLoader(ds, batch_size=4, seed=1)
    order = _ids(list(ref))
    touched.clear()
    loader = autockpt.ResumableLoader(ds, batch_size=4, seed=1)
    loader.load_state_dict({"epoch": 0, "batches": 9})
    assert _ids(list(loader)) == order[36:]
    assert sorted(touched) == sorted(order[36:])
    assert loader.state_dict() == {"epoch": 1, "batches": 0}
    sampler = autockpt.ResumableSampler(10, shuffle=False)
    sampler.load_state_dict({"epoch": 2, "position": 7})
    assert list(sampler) == [7, 8, 9] and sampler.state_dict() == {"epoch": 3, "position": 0}
    with pytest.raises(InvalidArgumentError):
        autockpt.ResumableLoader(ds, batch_size=4, sampler=autockpt.ResumableSampler(10))
    with pytest.raises(autockpt.errors.StateMismatchError):
        loader.load_state_dict({"epoch": -1})


def test_import_autockpt_does_not_import_torch() -> None:
    code = "import sys, autockpt; autockpt.resume; autockpt.ResumableLoader; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())



def test_configured_signal_stops_after_saving_the_step_it_came_in(tmp_path: Path) -> None:
    seen: list[int] = []
    def earlier(signum: int, frame: object) -> None:  # a handler installed before autockpt's
        seen.append(signum)

    before = signal.signal(signal.SIGUSR2, earlier)
    try:
        model, opt = _model_opt()
        with autockpt.resume(tmp_path, model=model, optimizer=opt, every_n_steps=100, signals=["SIGUSR2"],
                             async_save=True) as run:
            for step in run.steps(50):
                _train_one(model, opt)
                if step == 4:
                    os.kill(os.getpid(), signal.SIGUSR2)
                    _train_one(model, opt)  # the step goes on after the signal; it is not cut short
        weights = model.weight.detach().clone()
        assert seen == [signal.SIGUSR2]
        assert run.preempted and not run.finished and run.step == 5
        assert run.signal == signal.SIGUSR2 and run.exit_code == 128 + signal.SIGUSR2
        assert run.manager.all_steps() == [5]
        assert torch.equal(autockpt.load(tmp_path)["model"]["weight"], weights)
        assert signal.getsignal(signal.SIGUSR2) is earlier  # put back on leaving the block
    finally:
        signal.signal(signal.SIGUSR2, before)


def _train_one(model: object, opt: object) -> None:
    opt.zero_grad()
    model(torch.ones(2, 3)).pow(2).mean().backward()
    opt.step()


def test_preemption_while_an_async_save_is_in_flight_commits_it_and_the_last_step(tmp_path: Path) -> None:
    from autockpt.reader import open_checkpoint
    from autockpt.storage import open_storage as Storage

    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: each background save takes a while
    opt = torch.optim.Adam(model.parameters())
    with autockpt.resume(tmp_path, model=model, optimizer=opt, every_n_steps=1, max_to_keep=None,
                         async_save=True) as run:
        for step in run.steps(100):
            opt.zero_grad()
            model(torch.randn(4, 1024)).square().mean().backward()
            opt.step()
            if step == 3:  # the save of step 3 was started before this body ran, in the background
                os.kill(os.getpid(), signal.SIGTERM)
    weights = model.weight.detach().clone()
    assert run.preempted and run.step == 4 and run.exit_code == 128 + signal.SIGTERM
    storage = Storage(str(tmp_path))
    assert sorted(storage.scan().committed) == [1, 2, 3, 4]  # the in-flight save committed, then the last step
    for s in (1, 2, 3, 4):
        with open_checkpoint(storage, s):  # every one verifies (sizes, checksums, headers)
            pass
    assert torch.equal(autockpt.load(tmp_path)["model"]["weight"], weights)


# ---------------------------------------------------------------------------------------------- epoch-shaped loops
def test_epochs_shape_counts_steps_skips_trained_batches_and_keeps_per_epoch_code(tmp_path: Path) -> None:
    touched: list[int] = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> torch.Tensor:
            touched.append(i)
            return torch.tensor([float(i)])

    def train(directory: Path, crash_at: int | None = None) -> tuple[object, list, autockpt.Run, object]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Dropout(0.3), torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        loader = autockpt.ResumableLoader(Recording(), batch_size=4, shuffle=True, seed=2)  # 5 batches an epoch
        evals: list[tuple[int, int, float]] = []
        with autockpt.resume(directory, model=model, optimizer=opt, scheduler=sched, data=loader,
                             every_n_steps=3) as run:
            for epoch in run.epochs(3):
                for x in loader:  # an ordinary batch loop: one step per batch
                    if run.step == crash_at:
                        raise RuntimeError("crash")
                    opt.zero_grad()
                    model(x / 20).pow(2).mean().backward()
                    opt.step()
                evals.append((epoch, run.step, opt.param_groups[0]["lr"]))  # per-epoch code, in its place
                sched.step()
        return model, evals, run, loader

    ref_model, ref_evals, ref_run, loader = train(tmp_path / "ref")
    assert ref_evals == [(0, 5, 0.01), (1, 10, 0.005), (2, 15, 0.0025)]
    assert ref_run.finished and ref_run.manager.all_steps() == [3, 6, 9, 12, 15]  # every_n_steps counts batches
    with pytest.raises(RuntimeError, match="crash"):
        train(tmp_path / "run", crash_at=7)  # in the 3rd batch of epoch 1
    assert autockpt.CheckpointManager(tmp_path / "run").latest_step == 6  # the 1st batch of epoch 1
    touched.clear()
    model, evals, run, _ = train(tmp_path / "run")
    assert run.restored and run.step == 15 and evals == ref_evals[1:]  # epoch 1's code ran once, after its batches
    assert touched[:16] == loader.order(1)[4:]  # the batch trained before the crash was not loaded again
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_stop_is_saved_and_a_rerun_trains_nothing(tmp_path: Path) -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(12.0).unsqueeze(1))

    def epochs_run(n: int) -> tuple[autockpt.Run, list[int]]:
        model, opt = _model_opt()
        loader = autockpt.ResumableLoader(ds, batch_size=4)
        seen: list[int] = []
        with autockpt.resume(tmp_path / "epochs", model=model, optimizer=opt, data=loader, every_n_steps=100) as run:
            for epoch in run.epochs(n):
                for _ in loader:
                    _train_one(model, opt)
                seen.append(epoch)
                if epoch == 1:  # early stopping decided in per-epoch code
                    run.stop()
                    break
        return run, seen

    run, seen = epochs_run(10)
    assert seen == [0, 1] and run.stopped and run.finished and run.step == 6 and run.exit_code == 0
    assert run.manager.all_steps() == [6]
    run, seen = epochs_run(20)  # even with more epochs asked for
    assert seen == [] and run.restored and run.stopped and run.step == 6 and run.manager.all_steps() == [6]

    model, opt = _model_opt()
    loader = autockpt.ResumableLoader(ds, batch_size=4)
    trained = 0
    with autockpt.resume(tmp_path / "inner", model=model, optimizer=opt, data=loader, every_n_steps=100) as run:
        for _ in run.epochs(10):
            for _ in loader:
                _train_one(model, opt)
                trained += 1
                if run.step == 4:  # in the 2nd batch of epoch 1; no break: the loops end by themselves
                    run.stop()
    assert trained == 5 and run.step == 5 and run.manager.all_steps() == [5]

    model, opt = _model_opt()
    with autockpt.resume(tmp_path / "steps", model=model, optimizer=opt, every_n_steps=100) as run:
        for step in run.steps(100):
            _train_one(model, opt)
            if step == 4:
                run.stop()  # the step in progress counts: 5 updates are done
    assert run.stopped and run.step == 5 and run.manager.all_steps() == [5]
    with autockpt.resume(tmp_path / "steps", model=model, optimizer=opt, every_n_steps=100) as run:
        assert list(run.steps(200)) == [] and run.step == 5


def test_resumable_loader_is_a_dataloader_drop_in() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(10))
    for kwargs in (dict(), dict(drop_last=True), dict(shuffle=True), dict(shuffle=True, drop_last=True)):
        ours = autockpt.ResumableLoader(ds, batch_size=3, **kwargs)
        theirs = torch.utils.data.DataLoader(ds, batch_size=3, **kwargs)
        assert (len(ours), ours.dataset, ours.batch_size) == (len(theirs), ds, 3), kwargs
        assert [len(b[0]) for b in ours] == [len(b[0]) for b in theirs], kwargs
        if not kwargs.get("drop_last"):
            assert sorted(_ids([b[0] for b in ours])) == list(range(10)), kwargs
    seq = autockpt.ResumableLoader(ds, batch_size=3)  # shuffle=False, as DataLoader: in order, and resumable
    assert [b[0].tolist() for b in seq] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    seq.load_state_dict({"epoch": 3, "batches": 2})
    assert [b[0].tolist() for b in seq] == [[6, 7, 8], [9]]

    def collate(batch: list) -> list[int]:
        return [int(x[0]) * 10 for x in batch]

    opts = autockpt.ResumableLoader(ds, batch_size=4, shuffle=False, drop_last=True, collate_fn=collate,
                                    pin_memory=False, num_workers=0, timeout=0, worker_init_fn=None)
    assert list(opts) == [[0, 10, 20, 30], [40, 50, 60, 70]]
    assert opts.num_workers == 0 and opts.collate_fn is collate and opts.pin_memory is False  # DataLoader's
    # DataLoader's defaults spelled out (`sampler=DistributedSampler(ds) if ddp else None`) are a plain loader
    spelled = autockpt.ResumableLoader(ds, batch_size=4, sampler=None, batch_sampler=None, generator=None)
    assert [b[0].tolist() for b in spelled] == [b[0].tolist() for b in autockpt.ResumableLoader(ds, batch_size=4)]

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(3))

    refused = [
        (dict(sampler=torch.utils.data.SequentialSampler(ds)), "sampler=.*use shuffle= and seed="),
        (dict(batch_sampler=[[0, 1]]), "batch_sampler=.*use batch_size="),
        (dict(generator=torch.Generator()), "generator=.*use seed="),
        (dict(persistent_workers=True), "persistent_workers=True.*use num_workers="),
        (dict(shufle=True), r"unknown DataLoader arguments \['shufle'\]"),
        (dict(shuffle="yes"), "shuffle must be True or False"),
        (dict(batch_size=None), "batch_size must be an int"),
    ]
    for kwargs, match in refused:
        with pytest.raises(InvalidArgumentError, match=match):
            autockpt.ResumableLoader(ds, **kwargs)
    with pytest.raises(InvalidArgumentError, match="map-style dataset"):
        autockpt.ResumableLoader(Stream(), batch_size=2)


def test_a_checkpoint_without_the_loop_entry_still_resumes(tmp_path: Path) -> None:
    model, opt = _model_opt()
    _train_one(model, opt)
    with autockpt.CheckpointManager(tmp_path) as mgr:  # what autockpt.resume wrote before it saved "loop"
        mgr.save(3, {"model": model, "optimizer": opt, "rng": autockpt.RNGState()})
    model2, opt2 = _model_opt()
    with autockpt.resume(tmp_path, model=model2, optimizer=opt2) as run:
        assert run.restored and run.step == 3 and "loop" in run.state
    assert torch.equal(model2.weight, model.weight)


def test_epochs_needs_a_resumable_loader(tmp_path: Path) -> None:
    model, _ = _model_opt()
    run = autockpt.resume(tmp_path, model=model)
    with pytest.raises(InvalidArgumentError, match="data=autockpt.ResumableLoader"):
        run.epochs(3)


# ------------------------------------------------------------------------------------- a pytorch/examples script
MNIST_ORIGINAL = ROOT / "tests" / "scripts" / "mnist_original.py"
MNIST = ROOT / "tests" / "scripts" / "mnist_autockpt.py"


def test_the_mnist_example_is_converted_in_at_most_five_lines() -> None:
    import difflib

    diff = list(difflib.ndiff(MNIST_ORIGINAL.read_text().splitlines(), MNIST.read_text().splitlines()))
    changed = [ln for ln in diff if ln.startswith("+ ")]  # lines added or rewritten
    assert 0 < len(changed) <= 5, "\n".join(changed)
    assert "for epoch in run.epochs(1, args.epochs + 1):" in MNIST.read_text()  # the script keeps its shape
    assert "    test(model, device, test_loader)\n        scheduler.step()" in MNIST.read_text()


class Mnist:
    """One run of the converted mnist script in ``cwd`` (checkpoints go to ``cwd/checkpoints``); optionally
    sends ``sig`` once it printed batch ``batch`` of epoch ``epoch``."""

    def __init__(self, cwd: Path, sig: int | None = None, epoch: int = 0, batch: int = 0) -> None:
        cwd.mkdir(exist_ok=True)
        ckpt = cwd / "checkpoints"
        self.start = (autockpt.CheckpointManager(ckpt).latest_step or 0) if ckpt.exists() else 0
        env = _env()
        if sig is not None:
            env["MNIST_DELAY"] = "0.004"  # 0.13 s a batch: the signal lands in the epoch it was meant for
        p = subprocess.Popen([sys.executable, str(MNIST), "--save-model"], cwd=cwd, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        self.lines: list[str] = []
        for line in p.stdout:
            self.lines.append(line.rstrip("\n"))
            if sig is not None and line.startswith(f"Train Epoch: {epoch} [{batch * 32}/"):
                os.kill(p.pid, sig)
                break
        out, self.stderr = p.communicate(timeout=120)
        self.lines += out.splitlines()
        self.returncode = p.returncode
        self.losses = [ln.split()[-1] for ln in self.lines if ln.startswith("Train Epoch")]
        self.tests = [ln.split()[-1] for ln in self.lines if ln.startswith("Test set")]


def test_mnist_style_script_resumes_bit_identically_after_sigkill_and_sigterm_mid_epoch(
        tmp_path: Path, seed: int) -> None:
    rnd = random.Random(seed)
    ref = Mnist(tmp_path / "ref")
    assert ref.returncode == 0 and len(ref.losses) == 24 and len(ref.tests) == 3, ref.stderr[-3000:]
    d = tmp_path / "run"
    kill_at, term_at = rnd.randint(1, 5), rnd.randint(1, 4)  # batches of epoch 2 and 3
    killed = Mnist(d, signal.SIGKILL, 2, kill_at)
    assert killed.returncode == -signal.SIGKILL, (seed, killed.stderr[-3000:])
    termed = Mnist(d, signal.SIGTERM, 3, term_at)
    assert termed.returncode == 128 + signal.SIGTERM, (seed, termed.stderr[-3000:])
    n = autockpt.CheckpointManager(d / "checkpoints").latest_step
    assert n is not None and 16 < n < 24, (seed, n)  # mid-epoch 3
    assert f"autockpt: SIGTERM: saved step {n} to checkpoints; stopping (exit code 143)" in termed.stderr, (
        seed, termed.stderr[-3000:])
    assert termed.start + len(termed.losses) == n, (seed, "a step ran after the one saved")
    last = Mnist(d)
    assert last.returncode == 0 and last.start == n, (seed, last.stderr[-3000:])
    for run in (killed, termed, last):  # every step's loss, including steps re-run after the SIGKILL
        assert run.losses == ref.losses[run.start:run.start + len(run.losses)], (seed, run.start)
    assert last.tests[-1] == ref.tests[-1], seed
    got = torch.load(d / "mnist_cnn.pt", weights_only=True)
    want = torch.load(tmp_path / "ref" / "mnist_cnn.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), seed


# ---------------------------------------------------------------------------------------------- signal windows
EPOCHS_SCRIPT = ROOT / "tests" / "scripts" / "train_epochs.py"


def _epochs_script(d: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[int, str]]:
    env = dict(_env(), CKPT=str(d / "ckpt"))
    p = subprocess.run([sys.executable, str(EPOCHS_SCRIPT), "--params", str(d / "params.hex"), *args],
                       capture_output=True, text=True, env=env, timeout=120)
    losses = {int(ln.split()[1]): ln.split()[2] for ln in p.stdout.splitlines() if ln.startswith("loss ")}
    return p, losses


@pytest.fixture(scope="module")
def epochs_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, str], str]:
    d = tmp_path_factory.mktemp("epochs_ref")
    p, losses = _epochs_script(d)
    assert p.returncode == 0 and sorted(losses) == list(range(18)), p.stderr[-3000:]
    return losses, (d / "params.hex").read_text()


def _check_resumes_exactly(d: Path, first: dict[int, str], reference: tuple[dict[int, str], str]) -> None:
    ref_losses, ref_params = reference
    p, losses = _epochs_script(d)
    assert p.returncode == 0, p.stderr[-3000:]
    for step, loss in {**first, **losses}.items():
        assert loss == ref_losses[step], step
    assert (d / "params.hex").read_text() == ref_params


def _check_stopped(d: Path, p: subprocess.CompletedProcess[str], sig: str, line: str, committed: list[int]) -> None:
    code = 128 + getattr(signal, sig)
    assert p.returncode == code, p.stderr[-3000:]
    assert f"autockpt: {sig}: {line}; stopping (exit code {code})" in p.stderr.splitlines(), p.stderr[-3000:]
    assert autockpt.CheckpointManager(d / "ckpt").all_steps() == committed


def test_a_signal_in_every_window_commits_the_newest_step_and_the_resumed_run_is_exact(
        tmp_path: Path, epochs_reference: tuple[dict[int, str], str]) -> None:
    """One run after another in one directory, each signalling itself at another moment; then the last run
    finishes, and every step's loss and the final weights equal those of an uninterrupted run."""
    ckpt = tmp_path / "ckpt"
    seen: dict[int, str] = {}
    p, losses = _epochs_script(tmp_path, "--sigkill-at", "6")  # a crash leaves step 4
    assert p.returncode == -signal.SIGKILL and autockpt.CheckpointManager(ckpt).all_steps() == [4]
    seen.update(losses)
    # while the checkpoint is restored at start: nothing new, the checkpoint stays
    p, losses = _epochs_script(tmp_path, "--window", "restore")
    _check_stopped(tmp_path, p, "SIGTERM", f"no step completed since step 4 (the newest checkpoint in {ckpt})", [4])
    assert losses == {}
    # in step 8, while the async save of step 8 is in flight: it commits, then step 9
    p, losses = _epochs_script(tmp_path, "--window", "async")
    _check_stopped(tmp_path, p, "SIGTERM", f"saved step 9 to {ckpt}", [4, 8, 9])
    assert max(losses) == 8 and "INFLIGHT 8 yes" in p.stdout, p.stdout[-2000:]
    seen.update(losses)
    # in epoch 2's evaluation: the epoch's code finishes, then step 12 (the end of epoch 2) is saved
    p, losses = _epochs_script(tmp_path, "--window", "eval", "--signal", "SIGUSR1")
    _check_stopped(tmp_path, p, "SIGUSR1", f"saved step 12 to {ckpt}", [4, 8, 9, 12])
    assert max(losses) == 11 and "eval 2 " in p.stdout and "eval 3 " not in p.stdout
    seen.update(losses)
    # in the body of step 13 (a training step, no save in flight): that step finishes and is saved
    p, losses = _epochs_script(tmp_path, "--window", "step")
    _check_stopped(tmp_path, p, "SIGTERM", f"saved step 14 to {ckpt}", [4, 8, 9, 12, 14])
    assert sorted(losses) == [12, 13] and "eval 3 " not in p.stdout
    seen.update(losses)
    # while the final checkpoint is written: it commits, and the process still ends with 143
    p, losses = _epochs_script(tmp_path, "--window", "final_save")
    _check_stopped(tmp_path, p, "SIGTERM", f"saved step 18 to {ckpt}", [9, 12, 14, 16, 18])
    assert max(losses) == 17 and not (tmp_path / "params.hex").exists()  # the code after the loop did not run
    seen.update(losses)
    _check_resumes_exactly(tmp_path, seen, epochs_reference)  # trains nothing, runs the code after the loop


@pytest.mark.full
@pytest.mark.parametrize("window, sig, saved, committed", [
    ("step", "SIGTERM", 14, [4, 8, 12, 14]),  # in a training step: that step finishes and is saved
    ("async", "SIGTERM", 9, [4, 8, 9]),  # the in-flight save of step 8 commits, then step 9
    ("eval", "SIGUSR1", 12, [4, 8, 12]),  # in evaluation: epoch 2's code finishes, then step 12 is saved
    ("last_step", "SIGTERM", 18, [4, 8, 12, 16, 18]),
    ("final_save", "SIGTERM", 18, [4, 8, 12, 16, 18]),
])
def test_a_signal_in_each_window_commits_the_newest_step_and_exits_128_plus_signal(
        tmp_path: Path, epochs_reference: tuple[dict[int, str], str], window: str, sig: str, saved: int,
        committed: list[int]) -> None:
    p, losses = _epochs_script(tmp_path, "--window", window, "--signal", sig)
    code = 128 + getattr(signal, sig)
    assert p.returncode == code, p.stderr[-3000:]
    line = f"autockpt: {sig}: saved step {saved} to {tmp_path / 'ckpt'}; stopping (exit code {code})"
    assert line in p.stderr.splitlines(), p.stderr[-3000:]
    assert max(losses) == saved - 1  # no step ran past the one saved
    assert window != "async" or "INFLIGHT 8 yes" in p.stdout, p.stdout[-2000:]
    assert autockpt.CheckpointManager(tmp_path / "ckpt").all_steps() == committed
    if window in ("last_step", "final_save"):
        assert not (tmp_path / "params.hex").exists()  # the code after the loop did not run
    _check_resumes_exactly(tmp_path, losses, epochs_reference)


# ---------------------------------------------------------------------------------------------- torch.distributed
DIST_LOADER = ROOT / "tests" / "scripts" / "dist_loader.py"


def _gloo(n: int, out: Path, *args: str) -> list[dict]:
    """Run tests/scripts/dist_loader.py on ``n`` ranks of a real gloo process group; their results."""
    import socket

    out.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(n):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(DIST_LOADER), str(out), *args], env=env,
                                      stdout=open(out / f"log-{rank}.txt", "w"), stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((out / f"log-{r}.txt").read_text()[-2000:] for r in range(n))
    assert codes == [0] * n, f"exit codes {codes}:\n{logs}"
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(n)]


@pytest.mark.parametrize("before, after", [(2, 4), pytest.param(4, 2, marks=pytest.mark.full),
    pytest.param(2, 2, marks=pytest.mark.full),
    pytest.param(1, 2, marks=pytest.mark.full)])
def test_resumable_loader_shards_like_distributed_sampler_and_resumes_on_any_world_size(
        tmp_path: Path, before: int, after: int) -> None:
    """96 samples, batch 4: K=3 batches per rank on ``before`` ranks, saved (rank 0's state only), then the
    rest of the epoch on ``after`` ranks: every sample of the epoch exactly once across ranks and runs."""
    ckpt, k, batch = str(tmp_path / "ckpt"), 3, 4
    first = _gloo(before, tmp_path / "a", ckpt, "first", str(k))
    for r in first:  # each rank's batches are its DistributedSampler shard (same seed + epoch on every rank)
        assert r["taken"] == r["distributed_sampler_0"][: k * batch], r["rank"]
        assert r["len"] == len(r["distributed_sampler_0"]) // batch
        for drop_last in (False, True):  # padding (or dropping) of an uneven epoch as DistributedSampler does
            ours, theirs, len_ours, len_theirs = r[f"uneven_drop_last_{drop_last}"]
            assert ours == theirs and len_ours == len_theirs, (r["rank"], drop_last)
    consumed = k * batch * before
    # the global count: rank 0's copy suffices (one process saves the DataLoader-like {epoch, batches})
    assert first[0]["state"] == {"epoch": 0, "batches": k, **({"samples": consumed} if before > 1 else {})}
    rest = _gloo(after, tmp_path / "b", ckpt, "rest")
    assert all(r["restored"] == k and r["state"]["samples"] == consumed for r in rest)
    epoch0 = [i for r in first for i in r["taken"]] + [i for r in rest for i in r["rest_0"]]
    assert sorted(epoch0) == list(range(96)), f"{before} -> {after}: repeated or skipped samples"
    for r in rest:
        assert r["epoch_1"] == r["distributed_sampler_1"], r["rank"]  # the next epoch: DistributedSampler's shard
        if before == after:  # the same world size: exactly the batches an uninterrupted rank takes
            assert r["rest_0"] == r["distributed_sampler_0"][k * batch:], r["rank"]
