"""One run per folder (scale/rundir.py): a new run does not write into another run's folder unless told to
overwrite, resuming checks the config, run.resume=auto; SIGTERM / SIGINT stop a real run at a step boundary
with a checkpoint (one process and under torchrun), and the run resumes from it to the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.cli import main as cli
from scale import checkpoint as ckpt
from scale.rundir import changed_keys
from tests.scale.conftest import base_overrides, read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _run(world, out: Path, *more, **extra) -> int:
    (out.parent / "c.yaml").write_text("{}\n")
    return cli(["train", str(out.parent / "c.yaml"), *base_overrides(world, "sft", "sft", out, **extra), *more])


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_new_run_never_mixes_with_another(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(world, out, **{"run.max_steps": 3}) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert _run(world, out, "run.lr=0.001") == 2
    err = _err(capsys)
    assert err.startswith("ptlab train: error: run.output_dir:") and "holds another run" in err
    assert "metrics.jsonl" in err and "checkpoints" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before   # nothing truncated
    assert _run(world, out, "run.lr=0.001", "run.overwrite=true") == 0            # replaced, not mixed
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert json.loads((out / "config.json").read_text())["run"]["lr"] == 0.001
    assert ckpt.latest(out).name == "step-000002"


def test_resume_checks_the_config(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(world, out, **{"run.max_steps": 4, "run.stop_after": 2}) == 0
    assert _run(world, out, "run.resume=true", "run.lr=0.001", "run.seed=5", **{"run.max_steps": 4}) == 2
    err = _err(capsys)
    assert "run.resume:" in err and "run.lr: 0.01 -> 0.001" in err and "run.seed: 0 -> 5" in err
    assert ckpt.latest(out).name == "step-000002"
    # keys meant to change between the parts of one run: a longer run, another save interval
    assert _run(world, out, "run.resume=true", **{"run.max_steps": 5, "run.save_every": 3}) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_resume_auto(world, tmp_path):
    out = tmp_path / "run"
    assert _run(world, out, "run.resume=auto", **{"run.max_steps": 4, "run.stop_after": 2}) == 0  # nothing: a new run
    assert ckpt.latest(out).name == "step-000002"
    assert _run(world, out, "run.resume=auto", **{"run.max_steps": 4}) == 0                       # continues it
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_changed_keys_reads_nested_sections():
    a = {"run": {"lr": 1.0, "max_steps": 3}, "method": {"rl": {"estimator_options": {"eps_high": 0.2}}}}
    b = {"run": {"lr": 1.0, "max_steps": 9}, "method": {"rl": {"estimator_options": {"eps_high": 0.3}}}}
    assert changed_keys(a, b) == ["method.rl.estimator_options.eps_high"]
    assert changed_keys({"run": {"lr": 1.0}}, {"run": {"lr": 1.0, "threads": 2}}) == []   # a key added later


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interrupt(world, out: Path, sig: int, nproc: int = 0) -> subprocess.CompletedProcess:
    """Start a long real run, send `sig` once its first step is logged, and wait for it to end."""
    cfg = out.parent / "c.yaml"
    cfg.write_text("{}\n")
    ov = base_overrides(world, "sft", "sft", out, **{"run.max_steps": 5000, "run.save_every": 0, "run.cpu": True})
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
              str(_port())] if nproc else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([*launch, "-m", "experiments.cli", "train", str(cfg), *ov], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.2)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes(world, tmp_path, sig):
    out = tmp_path / "run"
    p = _interrupt(world, out, sig)
    assert p.returncode == 128 + sig, p.stderr[-2000:]
    assert f"{signal.Signals(sig).name} received" in p.stderr
    assert f"stopped by {signal.Signals(sig).name} at step" in p.stdout
    step = int(ckpt.latest(out).name.split("-")[1])
    logged = [r["step"] for r in read_metrics(out)]
    assert step >= 1 and logged == list(range(1, step + 1))   # stopped at a step boundary, all of it logged
    assert _run(world, out, "run.resume=auto", **{"run.max_steps": step + 2, "run.save_every": 0, "run.cpu": True}) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 3))


def test_sigterm_under_torchrun_stops_every_process_at_one_step(world, tmp_path):
    out = tmp_path / "run"
    p = _interrupt(world, out, signal.SIGTERM, nproc=2)
    assert p.returncode != 0
    step = int(ckpt.latest(out).name.split("-")[1])
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))
    assert "stopped by SIGTERM at step" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert _run(world, out, "run.resume=auto", **{"run.max_steps": step + 1, "run.save_every": 0,
                                                  "run.cpu": True}) == 0
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 2))


def test_report_to_logs_through_accelerate_trackers(world, tmp_path, capsys):
    """run.report_to sends the metrics to accelerate's trackers (tensorboard is the one installed here: its
    event file holds the logged scalars); an unknown or missing tracker fails naming the key."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert _run(world, out, "run.report_to=[tensorboard]", "run.tensorboard=false", **{"run.max_steps": 2}) == 0
    events = list((out / "ptlab").rglob("events.out.tfevents.*"))
    assert events, sorted(p.relative_to(out) for p in out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in read_metrics(out)])
    assert _run(world, tmp_path / "b", "run.report_to=[neptune]") == 2
    assert "run.report_to: unknown tracker 'neptune'" in _err(capsys)
