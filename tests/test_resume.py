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


def test_interrupted_training_matches_uninterrupted_bit_for_bit(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    c = Child(ref)
    assert c.returncode == 0 and c.start == 0, c.stderr[-3000:]
    ref_losses = _losses(ref)
    assert sorted(ref_losses) == list(range(TOTAL))

    seed = random.randrange(2**32)
    rnd = random.Random(seed)
    run = tmp_path / "run"
    run.mkdir()
    # KILL, TERM, TERM (the two TERMs inside one epoch), KILL, TERM with a second TERM during its save, KILL
    plan = [signal.SIGKILL, signal.SIGTERM, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]
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
        autockpt.ResumableLoader(ds, batch_size=4, sampler=None)
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
