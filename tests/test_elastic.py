"""dist.elastic: a job that survives a lost node and grows back when it returns.

Two `facetrain train` agents (one "node" of one gloo process each) meet at a c10d
rendezvous on this machine. One agent's whole process tree is killed mid-run; the other
restarts its worker at world size 1, which resumes from the latest checkpoint with the
classifier re-sharded. A new agent then joins: the running worker checkpoints and the job
goes on at world size 2. The final classifier must equal that of runs that follow the same
world-size history from the same checkpoints, and `train.record_samples` must show every
image of each epoch trained on once, apart from the steps run again after the loss.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from test_preflight import _one_line_error
from test_preflight import _train as _train_argv
from test_resume import _args, _assert_identical, _state, _train

from trainer.sample_record import read_samples

# Several multi-process runs on a loaded 2-core machine (see test_resume).
pytestmark = pytest.mark.timeout(1800)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
STEPS = 60
STARTED: list[subprocess.Popen[str]] = []  # agents, ended by `cleanup` whatever happens
ELASTIC = (
    f"train.max_steps={STEPS}",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=100",  # the reference runs start from the job's checkpoints
    "train.record_samples=true",
    "dist.nproc=1",
    "dist.max_restarts=2",
    "dist.timeout_s=120",
    "dist.elastic.min_nodes=1",
    "dist.elastic.max_nodes=2",
    "dist.elastic.last_call_s=5",
    "dist.elastic.keep_alive_s=2",
    "dist.elastic.join_timeout_s=300",
)


def _agent(
    tiny_dataset: Path, out: Path, port: int, node: int, nproc: int = 1
) -> subprocess.Popen[str]:
    """A `facetrain train` agent of node ``node`` with ``nproc`` ranks; its console goes to a
    file (a pipe that nobody reads while it runs could fill up and stall it)."""
    cmd = _args(tiny_dataset, out, "job", *ELASTIC, f"dist.nproc={nproc}", "--nnodes", "2")
    cmd += ["--node-rank", str(node)]
    console = open(out / f"node{node}-{time.monotonic_ns()}.out", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*cmd, "--rdzv", f"127.0.0.1:{port}"],
        stdout=console,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=out,
    )
    proc.console = Path(console.name)  # type: ignore[attr-defined]
    console.close()
    STARTED.append(proc)
    return proc


def _output(proc: subprocess.Popen[str]) -> str:
    return proc.console.read_text()  # type: ignore[attr-defined]


def _wait_for(what: str, ready, procs: list[subprocess.Popen[str]], limit: float = 600) -> None:
    deadline = time.time() + limit
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, f"{what}: an agent ended first:\n{_output(dead[0])}"
        assert time.time() < deadline, f"no {what} after {limit} s"
        time.sleep(0.2)


def _status(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the launcher, its torchrun agent (a session of its own) and the workers."""
    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=60)


@pytest.fixture
def cleanup():
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            _kill_tree(proc)


def _workers(launcher: subprocess.Popen[str]) -> list[psutil.Process]:
    """The launcher's training processes (under its torchrun agent)."""
    tree = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in tree if "launcher.worker" in p.cmdline()[:4]]  # not the agent


def _sigterm_pending(proc: psutil.Process) -> bool:
    """Whether ``proc`` has a SIGTERM waiting (it is stopped, or blocks it)."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", status, re.MULTILINE)
    return any(int(mask, 16) >> (signal.SIGTERM - 1) & 1 for mask in masks)


def _epoch_counts(lines: list[dict]) -> dict[int, collections.Counter]:
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in lines:
        counts[line["epoch"]].update(line["keys"])
    return counts


def _two_nodes(tiny_dataset: Path, out: Path, nproc: int) -> tuple[subprocess.Popen[str], ...]:
    """Nodes 0 and 1 of one job (``out/job``), ``nproc`` ranks each; and the port."""
    from _dist import free_port

    port = free_port()
    # Node 1's agent first: it waits for node 0's rendezvous to appear and joins it at once,
    # well within last_call_s, however long node 0 takes to start (a loaded machine).
    node1 = _agent(tiny_dataset, out, port, 1, nproc)
    _wait_for("node 1's agent", lambda: psutil.Process(node1.pid).children(), [node1])
    return _agent(tiny_dataset, out, port, 0, nproc), node1, port


def _lose_node1(
    run: Path, node0: subprocess.Popen[str], node1: subprocess.Popen[str], world: int
) -> int:
    """Kill node 1's whole tree once a checkpoint exists and training at world size ``world``
    has gone on past it (run.json says the step: train.log_every=1); node 0's ranks fail, its
    agent restarts them alone and they resume. Returns the step they resumed from."""

    def past_a_checkpoint() -> bool:
        status = _status(run)
        latest = run / "latest"
        return (
            status.get("world_size") == world
            and latest.exists()
            and status.get("step", 0) > int(latest.read_text().strip().split("-")[1]) + 1
        )

    _wait_for(f"checkpoint at world size {world}", past_a_checkpoint, [node0, node1])
    _kill_tree(node1)
    log = run / "training.log"
    lost = re.compile(
        rf"node lost: world size {world} -> {world // 2}, resumed from step-(\d+) "
        rf"\(world size {world} -> {world // 2}, classifier re-sharded\)"
    )
    _wait_for(f"restart at world size {world // 2}", lambda: lost.search(log.read_text()), [node0])
    return int(lost.search(log.read_text()).group(1))


def _files(run: Path) -> dict[tuple[int, int, int], list[dict]]:
    """train.record_samples of a run: (start step, world size, rank) -> its lines."""
    return {(f["start_step"], f["world_size"], f["rank"]): f["lines"] for f in read_samples(run)}


def _audit(files: dict, again: list[dict], num_images: int) -> None:
    """Every image of the pack once in each epoch, once the batches run ``again`` are taken
    out; at most once in the last epoch (cut short by the step count)."""
    seen = _epoch_counts([line for lines in files.values() for line in lines])
    for epoch, count in _epoch_counts(again).items():
        seen[epoch].subtract(count)
    every = collections.Counter(set().union(*seen.values()))  # each image of the pack once
    assert len(every) == num_images
    last = max(seen)
    for epoch in range(last):
        assert seen[epoch] == every, f"epoch {epoch}: {seen[epoch] - every} {every - seen[epoch]}"
    assert set(seen[last].values()) <= {0, 1}, f"epoch {last}: {seen[last]}"


@pytest.mark.usefixtures("cleanup")
def test_lost_node_shrinks_the_job_and_a_returning_node_grows_it(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    run = tmp_path / "job"
    node0, node1, port = _two_nodes(tiny_dataset, tmp_path, nproc=1)
    # 1.-2. Node 1 is lost: node 0's worker fails, its agent restarts it alone: it resumes
    # at world size 1.
    lost_at = _lose_node1(run, node0, node1, world=2)
    log = run / "training.log"

    # 3. The node comes back: the job checkpoints and goes on at world size 2. The worker
    # waits (SIGSTOP) until its agent has seen the new node and asked it to stop (SIGTERM
    # pending), so that the job is still running when the new agent is up, however slow.
    (worker,) = _workers(node0)
    worker.suspend()
    node1 = _agent(tiny_dataset, tmp_path, port, 1)
    _wait_for("the agent's stop request", lambda: _sigterm_pending(worker), [node0, node1])
    worker.resume()
    assert node1.wait(timeout=900) == 0, _output(node1)
    assert node0.wait(timeout=900) == 0, _output(node0)
    text = log.read_text()
    grown = re.search(
        r"node joined: world size 1 -> 2, resumed from step-(\d+) \(world size 1", text
    )
    assert grown, text
    grown_at = int(grown.group(1))
    assert lost_at < grown_at < STEPS, (
        "the job did not grow back mid-run: the rank, resumed (SIGCONT) with its agent's "
        f"SIGTERM pending, must stop at its next step and checkpoint\n{text}"
    )
    meta = json.loads((run / f"step-{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == 2

    # The same world-size history from the same checkpoint: step-lost_at at world size 1 up
    # to step-grown_at, then world size 2 (a plain torchrun job) to the end.
    ref = ("train.record_samples=true", f"train.max_steps={STEPS}", "train.keep_checkpoints=100")
    _train(
        tiny_dataset,
        tmp_path,
        "ref",
        *ref,
        "dist.nproc=1",
        f"train.stop_at_step={grown_at}",
        "--resume",
        str(run / f"step-{lost_at}"),
    )
    _train(tiny_dataset, tmp_path, "ref", *ref, "dist.nproc=2", "--resume", "auto")
    # Bit-equal: the same ranks, seeds and data order at each world size, and gloo's sums of
    # two ranks' values are the same whichever rank adds.
    _assert_identical(
        _state(tmp_path / "ref" / f"step-{STEPS}", 2), _state(run / f"step-{STEPS}", 2)
    )

    # Every image once per epoch, apart from the steps run again: those the first job ran
    # past step-lost_at, and at the grow-back, the images between the world size 2 batch the
    # job restarts at and step-grown_at's position (one world size 1 batch when it stopped
    # after an odd number of them: a start mid-batch of the new world size is not kept).
    files = _files(run)
    assert set(files) == {(0, 2, 0), (0, 2, 1), (lost_at, 1, 0), (grown_at, 2, 0), (grown_at, 2, 1)}
    shrunk = [line for line in files[(lost_at, 1, 0)] if line["step"] <= grown_at]
    assert [line["step"] for line in shrunk] == list(range(lost_at + 1, grown_at + 1))
    odd = json.loads((run / f"step-{grown_at}" / "meta.json").read_text())["batch_in_epoch"] % 2
    again = [line for r in (0, 1) for line in files[(0, 2, r)] if line["step"] > lost_at]
    again += [line for line in files[(lost_at, 1, 0)] if line["step"] > grown_at]
    again += shrunk[len(shrunk) - odd :]
    _audit(files, again, meta["derived"]["num_images"])
    print(f"lost at step {lost_at}, grown at {grown_at}: {len(again)} batches run again")

    # The reference ran the same batches after step-lost_at.
    assert _files(tmp_path / "ref") == {(lost_at, 1, 0): shrunk} | {
        key: lines for key, lines in files.items() if key[0] == grown_at
    }


@pytest.mark.usefixtures("cleanup")
def test_lost_node_of_two_ranks(tiny_dataset: Path, tmp_path: Path) -> None:
    """Nodes of two ranks each: world size 4 -> 2, the classifier's 4 shards re-sharded onto
    2; the same as resuming the checkpoint at world size 2 by hand."""
    run = tmp_path / "job"
    node0, node1, _ = _two_nodes(tiny_dataset, tmp_path, nproc=2)
    lost_at = _lose_node1(run, node0, node1, world=4)
    assert node0.wait(timeout=900) == 0, _output(node0)
    meta = json.loads((run / f"step-{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == 2

    ref = ("train.record_samples=true", f"train.max_steps={STEPS}", "dist.nproc=2")
    _train(tiny_dataset, tmp_path, "ref", *ref, "--resume", str(run / f"step-{lost_at}"))
    _assert_identical(
        _state(tmp_path / "ref" / f"step-{STEPS}", 2), _state(run / f"step-{STEPS}", 2)
    )
    files = _files(run)
    assert set(files) == {(0, 4, r) for r in range(4)} | {(lost_at, 2, r) for r in (0, 1)}
    again = [line for r in range(4) for line in files[(0, 4, r)] if line["step"] > lost_at]
    _audit(files, again, meta["derived"]["num_images"])
    assert _files(tmp_path / "ref") == {k: v for k, v in files.items() if k[0] == lost_at}


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["dist.elastic.min_nodes=3", "dist.elastic.max_nodes=2"], "dist.elastic.min_nodes: 3"),
        (["dist.elastic.max_nodes=2", "dist.max_restarts=0"], "dist.max_restarts: dist.elastic"),
        (["dist.elastic.max_nodes=2", "--nnodes 3", "--rdzv 127.0.0.1:1"], "--nnodes 3"),
        (["dist.elastic.max_nodes=2"], "dist.elastic: needs --rdzv"),
        (["dist.elastic.keep_alive_s=0"], "dist.elastic.keep_alive_s"),
    ],
)
@pytest.mark.usefixtures("no_start")
def test_elastic_config_errors_are_one_line_before_any_process(
    tiny_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sets: list[str],
    expected: str,
) -> None:
    argv = _train_argv(tiny_dataset, tmp_path, "dist.max_restarts=1", *sets, dry_run=False)
    line = _one_line_error(argv, capsys)
    assert expected in line, line


def test_elastic_torchrun_options() -> None:
    """min..max nodes at a c10d rendezvous hosted by node 0 (two agents on one machine would
    both claim it otherwise), with the config's timeouts."""
    from launcher.elastic import rendezvous_args
    from trainer.dist_config import ElasticConfig

    elastic = ElasticConfig(min_nodes=1, max_nodes=3, last_call_s=4, keep_alive_s=2)
    args = rendezvous_args(elastic, 0, "10.0.0.1:29400", "run")
    assert args[:4] == [
        "--nnodes=1:3",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=run",
    ]
    conf = dict(item.split("=") for item in args[4].removeprefix("--rdzv-conf=").split(","))
    assert conf["is_host"] == "1" and conf["last_call_timeout"] == "4"
    assert conf["keep_alive_interval"] == "2" and conf["join_timeout"] == "600"
    assert "is_host=0" in rendezvous_args(elastic, 1, "10.0.0.1:29400", "run")[4]


def test_a_restart_continues_the_run_folder(tmp_path: Path) -> None:
    """A restarted or elastic job resumes the run's latest checkpoint, even when the config
    named another one to start from; with none in the run folder, the config holds."""
    from trainer.config import config_from_dict
    from trainer.resume import continue_run

    raw = {"data": {"train": "pack"}, "run": {"output_dir": str(tmp_path), "resume": "/x"}}
    config = config_from_dict(raw)
    assert continue_run(config).run.resume == "/x"
    (tmp_path / "run" / "step-4").mkdir(parents=True)
    (tmp_path / "run" / "step-4" / "meta.json").write_text("{}")
    assert continue_run(config).run.resume == "auto"


def test_a_fresh_tmp_folder_drops_a_killed_jobs_files(tmp_path: Path) -> None:
    from trainer.checkpoint import fresh_tmp_dir

    stale = tmp_path / "step-5.tmp"
    stale.mkdir()
    (stale / "classifier-rank1.pt").write_bytes(b"world size 2")
    assert list(fresh_tmp_dir(tmp_path, 5).iterdir()) == []


def test_an_elastic_slurm_job_outlives_a_lost_node(
    tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job script keeps the job (--no-kill) and its step (srun --kill-on-bad-exit=0)
    when a node fails; a fixed job keeps Slurm's defaults."""
    from test_submit import _script

    elastic = ("--set", "dist.elastic.max_nodes=3", "--set", "dist.max_restarts=2")
    script = _script(tiny_dataset, capsys, "--gpus-per-node", "0", *elastic)
    assert "#SBATCH --no-kill" in script and "srun --kill-on-bad-exit=0" in script
    fixed = _script(tiny_dataset, capsys, "--gpus-per-node", "0")
    assert "--no-kill" not in fixed and "srun --kill-on-bad-exit=1" in fixed


def test_an_elastic_worker_continues_the_run_with_the_configured_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker of an elastic job resumes the run folder's latest checkpoint -- also a
    node's first start, whose restart count is 0 (a node that joins later) -- and joins the
    process group with dist.timeout_s."""
    from launcher import worker
    from trainer.config import load_config

    seen: dict[str, object] = {}

    class FakeTrainer:
        def __init__(self, config, *_args: object) -> None:
            seen["resume"] = config.run.resume

        def fit(self) -> dict:
            return {"stopped": "received SIGTERM", "checkpoint": "ckpt"}

    def init_process_group(_ctx, timeout_s: float = 1800.0, **_kwargs: object) -> None:
        seen["timeout_s"] = timeout_s

    monkeypatch.setattr(worker, "Trainer", FakeTrainer)
    monkeypatch.setattr(worker.launch_env, "init_process_group", init_process_group)
    monkeypatch.setattr(worker.launch_env, "barrier", lambda: None)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    (tmp_path / "run" / "step-4").mkdir(parents=True)
    (tmp_path / "run" / "step-4" / "meta.json").write_text("{}")
    sets = [f"run.output_dir={tmp_path}", "run.name=run", "dist.timeout_s=42"]
    elastic = ["dist.elastic.max_nodes=2", "dist.max_restarts=1"]
    worker.run_worker(load_config(DEMO_CONFIG, sets))
    assert seen == {"resume": None, "timeout_s": 42.0}
    worker.run_worker(load_config(DEMO_CONFIG, sets + elastic))
    assert seen == {"resume": "auto", "timeout_s": 42.0}
