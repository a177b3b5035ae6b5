"""A run folder's own account: config.yaml, training.log, the console without carriage
returns off a terminal, run.json, the resumed job's first line and `facetrain runs`."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher import cli
from trainer.config import config_from_dict, load_config
from trainer.context import DistContext
from trainer.loop import Trainer
from trainer.run_log import Pace, RunLog, format_eta
from trainer.run_status import STATUS_FILE, read_run

REPO = Path(__file__).resolve().parents[1]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
STEP_LINE = re.compile(
    STAMP + r"\[step (\d+)/(\d+)\] epoch (\d+)  loss (\S+)  lr (\S+)  samples/s (\S+)  "
    r"eta (\S+)  emb_norm (\S+)"
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit(tiny_dataset: Path, out: Path, name: str, *overrides: str) -> tuple[Trainer, dict]:
    """A 1-process run in this process (the launcher's single-process path)."""
    cfg = load_config(
        REPO / "configs" / "demo_cpu.yaml",
        [
            f"data.train={tiny_dataset / 'train'}",
            f"data.val=[{tiny_dataset / 'val.bin'}]",
            "data.workers=0",
            f"run.output_dir={out}",
            f"run.name={name}",
            "train.batch_size=4",
            "train.max_steps=4",
            "train.log_every=2",
            "train.eval_every=2",
            "eval.batch_size=16",
            "wandb.mode=disabled",
            "export.onnx=false",
            "dist.nproc=1",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, DistContext.single())
    return trainer, trainer.fit()


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished run (its console captured) and a stopped one, in one output folder."""
    out = tmp_path_factory.mktemp("runs")
    console = io.StringIO()  # not a terminal, as a Slurm log
    stdout, sys.stdout = sys.stdout, console
    try:
        done, summary = _fit(tiny_dataset, out, "done")
    finally:
        sys.stdout = stdout
    _fit(tiny_dataset, out, "halted", "train.stop_at_step=2", "train.eval_at_start=false")
    return {"out": out, "config": done.config, "summary": summary, "console": console.getvalue()}


def test_config_yaml_is_the_resolved_config(runs: dict) -> None:
    text = (runs["out"] / "done" / "config.yaml").read_text()
    assert config_from_dict(yaml.safe_load(text)) == runs["config"]


def test_training_log_has_timestamped_lines_with_every_field(runs: dict) -> None:
    lines = (runs["out"] / "done" / "training.log").read_text().splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines
    assert "started run done: step 0/4" in lines[0]
    steps = [STEP_LINE.match(line) for line in lines if "[step " in line]
    assert [int(m.group(1)) for m in steps] == [2, 4] and all(m.group(2) == "4" for m in steps)
    for m in steps:
        loss, lr, rate, norm = (float(m.group(i)) for i in (4, 5, 6, 8))
        assert math.isfinite(loss) and lr > 0 and rate > 0 and norm > 0
        assert re.fullmatch(r"\d+:\d\d:\d\d", m.group(7))  # the ETA
    # Evaluations at steps 0 (before training), 2 and 4, with the best accuracy so far.
    evals = [line for line in lines if "[eval step" in line]
    best = runs["summary"]["eval_after"]["val"]["best_accuracy"]
    assert len(evals) == 3 and f"best {100 * best:.2f}%" in evals[-1]
    for line in evals:
        assert re.search(r"val: accuracy [\d.]+% \+- [\d.]+  best [\d.]+%  auc [\d.]+", line)
    assert re.search(r"finished at step 4/4; checkpoint step-4; 4 steps in [\d.]+ s", lines[-1])


def test_console_off_a_terminal_prints_the_log_lines(runs: dict) -> None:
    console = runs["console"]
    assert "\r" not in console
    logged = (runs["out"] / "done" / "training.log").read_text()
    assert console == logged  # the same lines, as they happen


def test_console_on_a_terminal_draws_a_bar(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    log = RunLog(tmp_path, enabled=True, progress=True, stream=term)
    log.start_bar(10, 0)
    log.step(2, "[step 2/10] epoch 0  loss 1.0", loss="1.000", ips="12.5", eta="0:00:08")
    log.message("[eval step 2] val: accuracy 50.00% +- 1.00")
    log.close()
    shown = term.getvalue()
    assert "\r" in shown and "ips=12.5" in shown and "eta=0:00:08" in shown
    assert "[step 2/10]" not in shown and "[eval step 2]" in shown  # the bar shows the steps
    assert "[step 2/10]" in (tmp_path / "training.log").read_text()


def test_first_report_leaves_the_start_up_out() -> None:
    """The first step takes 30 s (workers, allocations), the next ones 1 s each."""
    now = [0.0]
    pace = Pace(clock=lambda: now[0])
    pace.start(0)
    for seconds in (30.0, 1.0):
        pace.step_started()
        now[0] += seconds
        pace.step_done()
    rate, eta = pace.report(2, 102, global_batch=8)
    assert rate == 8.0 and eta == 100.0  # not 16 samples / 31 s, not 15.5 s x 100 steps
    # A report after the first step alone: finite and positive, whatever the start-up cost.
    alone = Pace(clock=lambda: now[0])
    alone.start(0)
    alone.step_started()
    now[0] += 4000.0
    alone.step_done()
    rate, eta = alone.report(1, 2, global_batch=8)
    assert 0 < rate < 1 and eta == 4000.0 and format_eta(eta) == "1:06:40"


def test_resumed_job_says_so_first_and_counts_its_own_steps(runs: dict, tiny_dataset: Path) -> None:
    out = runs["out"]
    shutil.copytree(out / "halted", out / "again")
    console = io.StringIO()
    stdout, sys.stdout = sys.stdout, console
    try:
        _, summary = _fit(
            tiny_dataset, out, "again", "run.resume=auto", "train.max_steps=5", "train.log_every=1"
        )
    finally:
        sys.stdout = stdout
    lines = console.getvalue().splitlines()
    assert lines[0].endswith("resumed from step-2 (world size 1, exact continuation)"), lines
    assert "continuing run again: step 2/5" in lines[1]
    train = summary["train"]
    assert (train["start_step"], train["steps_this_run"], train["steps"]) == (2, 3, 5)
    assert train["seconds_total"] > train["seconds"] > 0  # the first job's time counts too
    assert re.search(r"this run 3 steps \(2 -> 5\) in [\d.]+ s .*; in all 5 steps in", lines[-1])
    first = next(STEP_LINE.match(line) for line in lines if "[step " in line)
    assert first.group(1) == "3" and float(first.group(6)) > 0  # samples/s
    # The log goes on in the same file: the first job's lines, then this one's.
    log = (out / "again" / "training.log").read_text()
    assert log.index("stopped at step 2/4") < log.index("resumed from step-2")


def test_runs_lists_finished_stopped_and_running_runs(
    runs: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    out = runs["out"]
    # A run whose rank 0 is alive on this host (this test process), one whose process died
    # without a word (a pid that has ended), and folders a crash left half-written.
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    for name, pid in (("live", os.getpid()), ("killed", proc.pid)):
        (out / name).mkdir()
        status = {"state": "running", "pid": pid, "host": socket.gethostname()}
        status.update(started=time.time(), step=7, total_steps=9, loss=3.25, wandb_id="abc123")
        (out / name / STATUS_FILE).write_text(json.dumps(status))
    # Seen from another host: running while its folder is fresh, stopped once it is stale.
    for name, age in (("remote", 0), ("lost", 3600)):
        (out / name).mkdir()
        status = {"state": "running", "pid": 1, "host": "node-that-is-not-here", "step": 5}
        (out / name / STATUS_FILE).write_text(json.dumps({**status, "started": time.time()}))
        os.utime(out / name / STATUS_FILE, (time.time() - age,) * 2)
    (out / "torn").mkdir()
    (out / "torn" / "step-3.tmp").mkdir()
    (out / "torn" / "training.log").write_text("")
    (out / "torn" / STATUS_FILE).write_text('{"state": "runn')  # cut short
    an_hour_ago = time.time() - 3600
    for name in ("training.log", STATUS_FILE):
        os.utime(out / "torn" / name, (an_hour_ago, an_hour_ago))
    (out / "plots").mkdir()  # not a run

    assert cli.main(["runs", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["RUN", "STEP", "LOSS", "BEST", "ACCURACY", "WANDB", "STATE"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert {"done", "halted", "killed", "live", "torn", "lost"} <= set(rows)
    assert "plots" not in rows
    best = runs["summary"]["eval_after"]["val"]["best_accuracy"]
    done = read_run(out / "done")
    assert (done.state, done.step, done.total_steps, done.best_accuracy) == (
        "finished",
        4,
        4,
        {"val": best},
    )
    assert re.search(rf"4/4\s+[\d.]+\s+val {100 * best:.2f}%\s+-\s+finished$", rows["done"])
    assert re.search(r"2/4 .* stopped \(train.stop_at_step=2 reached\)", rows["halted"])
    assert re.search(r"7/9\s+3.2500\s+-\s+abc123\s+running$", rows["live"])
    assert "stopped (process ended without a word: killed?)" in rows["killed"]
    assert re.search(r"-/\?\s+-\s+-\s+-\s+stopped", rows["torn"])
    assert rows["remote"].endswith("running (on node-that-is-not-here)")
    assert "stopped (on node-that-is-not-here, nothing written for 15 min)" in rows["lost"]
    assert cli.main(["runs", str(out / "nowhere")]) == 2
