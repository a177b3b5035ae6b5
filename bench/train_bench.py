"""Training throughput: the real loop end to end vs the bare step on in-memory batches.

End to end = ``Trainer._train_steps`` (data loading and decoding, backbone under DDP,
Partial FC, optimizer steps, LR schedule, logging). Bare = the same optimizer step fed one
cached batch over and over (no loader, no logging): what the model alone costs. The gap is
the overhead of everything around the math; the goal is <= 15 %.

    .venv/bin/python bench/train_bench.py                   # demo config, 2 processes
    .venv/bin/python bench/train_bench.py --steps 100 --set train.batch_size=32

Needs the demo data (``make demo`` or ``facetrain synth ... --out data/demo``).
Prints a table and writes JSON (default bench/results/train_bench.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo_cpu.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before each phase")
    p.add_argument("--steps", type=int, default=60, help="timed steps per phase")
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "train_bench.json"))
    return p.parse_args(argv)


def _repo_relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (no machine paths in JSON)."""
    full = Path(path).resolve()
    return str(full.relative_to(REPO)) if full.is_relative_to(REPO) else path


def _timed_steps(trainer, batches, steps: int) -> float:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer._one_step(batches)
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from dataio.loading import to_model_input
    from launcher.env import dist_context_from_env, init_process_group
    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.monitor import WandbRun

    overrides = [
        *args.overrides,
        "wandb.mode=disabled",
        "train.progress=false",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.histogram_every=0",
        f"train.max_steps={args.warmup + args.steps}",
    ]
    config = load_config(args.config, overrides)
    ctx = dist_context_from_env(config.dist.device, config.dist.backend)
    init_process_group(ctx)
    trainer = Trainer(config, ctx)
    global_batch = config.train.batch_size * ctx.world_size * config.train.grad_accum_steps

    # End to end: the real loop (loader, logging, schedule) over warmup + steps.
    trainer.engine.model.train()
    batches = trainer._batches()
    for _ in range(args.warmup):
        trainer._one_step(batches)
    trainer.step = args.warmup
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    trainer._train_steps(WandbRun(config.wandb, trainer.run_dir, "bench", {}, False))
    if dist.is_initialized():
        dist.barrier()
    e2e = time.perf_counter() - start

    # Bare: the same step on one cached batch (no data loading, no logging), its pixels
    # already normalised on the device, so the end-to-end figure counts that as overhead.
    fresh = trainer._batches()
    cached = [
        (to_model_input(x, ctx.device), y)
        for x, y in (next(fresh) for _ in range(config.train.grad_accum_steps))
    ]
    bare_batches = itertools.cycle(cached)
    for _ in range(args.warmup):
        trainer._one_step(bare_batches)
    bare = _timed_steps(trainer, bare_batches, args.steps)

    if ctx.is_main:
        result = {
            "config": _repo_relative(args.config),
            "overrides": args.overrides,
            "world_size": ctx.world_size,
            "global_batch": global_batch,
            "steps": args.steps,
            "end_to_end_samples_per_sec": args.steps * global_batch / e2e,
            "bare_step_samples_per_sec": args.steps * global_batch / bare,
        }
        result["overhead"] = (
            1.0 - result["end_to_end_samples_per_sec"] / result["bare_step_samples_per_sec"]
        )
        print(f"{'phase':<34} {'samples/s':>10}")
        e2e_rate = result["end_to_end_samples_per_sec"]
        print(f"{'end to end (loader + step + log)':<34} {e2e_rate:>10.1f}")
        print(f"{'bare step (cached batch)':<34} {result['bare_step_samples_per_sec']:>10.1f}")
        print(f"{'overhead':<34} {100 * result['overhead']:>9.1f}%")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if "RANK" in os.environ or args.nproc == 1:
        worker(args)
        return 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        __file__,
        *(argv if argv is not None else sys.argv[1:]),
    ]
    return subprocess.call(cmd, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
