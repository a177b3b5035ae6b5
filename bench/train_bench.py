"""Training throughput: eager against each option of the backbone's step (train.compile,
train.channels_last, bf16 autocast), end to end and bare, alternated in one run.

For each model one torchrun job (``--nproc`` ranks, demo pack, 112x112) builds one Trainer
per option in the same processes, then takes ``--rounds`` rounds; in each round every option
in turn runs ``--steps`` steps end to end (the loader's workers decoding JPEGs, the uint8 ->
float normalisation, backbone under DDP, Partial FC, both optimizers, LR schedules) and
``--steps`` bare steps (the same optimizer step fed one cached, normalised batch: what the
model alone costs). Figures are medians over the rounds, ratios are against ``eager`` (train.
compile false, contiguous, fp32) measured in the same rounds. "first step" is the option's
first step: with compile, the compile (or the compile cache's load, on a second run).
``--one-trainer`` holds one option's Trainer at a time, built again each round (a model too
large for two at once: iresnet50 at W = 2 on 24 GB).

    .venv/bin/python bench/train_bench.py                     # the three models, all options
    .venv/bin/python bench/train_bench.py --models iresnet_nano --rounds 5 --steps 20
    .venv/bin/python bench/train_bench.py --demo 2 --demo-steps 300   # whole `facetrain train`

``--demo N`` instead runs ``facetrain train configs/demo_cpu.yaml`` N times per variant,
alternating ``eager`` (fp32, contiguous, not compiled), ``config`` (the recipe as it is, what
``make demo`` runs: bf16 + channels-last) and, if asked, ``config+compile``, each a fresh
start; it reports the run's
samples/s (its first step left out, as training.log counts), the whole command's wall-clock
time (start, evaluations, export, a compile included) and the held-out accuracy.

Needs the demo data (``make demo`` or ``facetrain synth ... --out data/demo``). Prints tables
and writes JSON (default bench/results/train_bench.json).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import REPO, timed  # bench/ is sys.path[0] when a bench runs

DEMO = REPO / "configs" / "demo_cpu.yaml"
EAGER = ["train.compile=false", "train.channels_last=false", "train.precision=fp32"]
OPTION_SETS = {
    "eager": [],
    "channels_last": ["train.channels_last=true"],
    "bf16": ["train.precision=bf16"],
    "compile": ["train.compile=true"],
    "max-autotune": ["train.compile=max-autotune"],
}
DEFAULT_OPTIONS = "eager,channels_last,bf16,compile,compile+bf16+channels_last"
# --demo: the backbone's step eager (fp32, contiguous), the recipe as it is, and compiled.
DEMO_VARIANTS = {
    "eager": EAGER,
    "config": [],
    "config+compile": ["train.compile=true"],
}
STEPS = {"iresnet_nano": 10, "iresnet18": 3, "iresnet50": 2}
EMBEDDING = {"iresnet_nano": 128}  # the others: 512, as published


def option_overrides(option: str) -> list[str]:
    """``eager`` plus each ``+``-joined part's overrides, e.g. ``compile+bf16``."""
    out = list(EAGER)
    for part in option.split("+"):
        if part not in OPTION_SETS:
            raise SystemExit(f"--options: unknown option {part!r}; known: {', '.join(OPTION_SETS)}")
        out += OPTION_SETS[part]
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEMO))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--models", default="iresnet_nano,iresnet18,iresnet50")
    p.add_argument("--options", default=DEFAULT_OPTIONS, help="comma-separated, parts joined by +")
    p.add_argument("--batch", type=int, default=64, help="images per rank")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps per phase and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile)")
    p.add_argument(
        "--one-trainer",
        action="store_true",
        help="hold one option's Trainer at a time, built again each round (memory)",
    )
    p.add_argument("--demo", type=int, default=0, help="N alternated pairs of whole demo runs")
    p.add_argument(
        "--demo-variants",
        default="eager,config,config+compile",
        help="of: " + ", ".join(DEMO_VARIANTS),
    )
    p.add_argument("--demo-steps", type=int, default=None, help="train.max_steps of those runs")
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "train_bench.json"))
    p.add_argument("--worker-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _timed(trainer, batches, steps: int) -> float:
    """Seconds of ``steps`` training steps on every rank (from a common start)."""

    def run() -> None:
        for _ in range(steps):
            trainer._one_step(batches)

    return timed(run, _barrier)


def worker(args: argparse.Namespace) -> None:
    """One model, every option, in this rank's process (under torchrun)."""
    import torch.distributed as dist

    from dataio.loading import to_model_input
    from launcher.env import compile_cache_dir, dist_context_from_env, init_process_group
    from trainer.config import load_config
    from trainer.loop import Trainer

    model = args.worker_model
    steps = args.steps or STEPS.get(model, 3)
    options = args.options.split(",")
    base = [
        *args.overrides,
        f"model.backbone={model}",
        f"model.embedding_size={EMBEDDING.get(model, 512)}",
        f"train.batch_size={args.batch}",
        "data.val=[]",
        "wandb.mode=disabled",
        "train.progress=false",
        "train.max_steps=100000",  # the schedule never ends during the bench
    ]
    compile_cache_dir()
    ctx = None

    def build(option: str):
        """A warmed-up Trainer of ``option``, its batches and one cached batch, the first
        step's seconds."""
        nonlocal ctx
        config = load_config(args.config, [*base, *option_overrides(option)])
        if ctx is None:
            ctx = dist_context_from_env(config.dist.device, config.dist.backend)
            init_process_group(ctx)
        trainer = Trainer(config, ctx)
        trainer.engine.model.train()
        batches = trainer._batches()
        first = _timed(trainer, batches, 1)
        _timed(trainer, batches, args.warmup - 1)
        x, y = next(batches)
        cached = itertools.cycle([(to_model_input(x, ctx.device), y)])
        _timed(trainer, cached, 1)
        return trainer, batches, cached, first

    # Every option's Trainer kept, or (--one-trainer) one at a time, built again each round.
    built = {} if args.one_trainer else {option: build(option) for option in options}
    first: dict[str, float] = {o: built[o][3] for o in built}
    e2e: dict[str, list[float]] = {o: [] for o in options}
    bare: dict[str, list[float]] = {o: [] for o in options}
    for _ in range(args.rounds):
        for option in options:
            trainer, batches, cached, first_s = built.get(option) or build(option)
            first.setdefault(option, first_s)
            global_batch = args.batch * ctx.world_size
            e2e[option].append(steps * global_batch / _timed(trainer, batches, steps))
            bare[option].append(steps * global_batch / _timed(trainer, cached, steps))
            del trainer, batches, cached
            gc.collect()
    if ctx.is_main:
        rows = [
            {
                "model": model,
                "option": option,
                "first_step_s": first[option],
                "end_to_end_samples_per_sec": statistics.median(e2e[option]),
                "bare_step_samples_per_sec": statistics.median(bare[option]),
                "end_to_end_rounds": e2e[option],
                "bare_rounds": bare[option],
            }
            for option in options
        ]
        Path(args.worker_json).write_text(json.dumps(rows))
    _barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def _torchrun(args: argparse.Namespace, extra: list[str]) -> int:
    argv = ["--config", args.config, "--options", args.options, "--batch", str(args.batch)]
    argv += ["--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    argv += ["--steps", str(args.steps)] if args.steps else []
    argv += ["--one-trainer"] if args.one_trainer else []
    argv += [x for item in args.overrides for x in ("--set", item)]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        __file__,
        *argv,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, cwd=REPO, env=env)


def _print_models(rows: list[dict]) -> None:
    print(
        f"\n{'model':<13} {'option':<28} {'first step s':>12} {'e2e /s':>8} {'x eager':>8} "
        f"{'bare /s':>8} {'x eager':>8}"
    )
    base = {r["model"]: r for r in rows if r["option"] == "eager"}
    for r in rows:
        e = base.get(r["model"])
        xe = (
            r["end_to_end_samples_per_sec"] / e["end_to_end_samples_per_sec"] if e else float("nan")
        )
        xb = r["bare_step_samples_per_sec"] / e["bare_step_samples_per_sec"] if e else float("nan")
        r["end_to_end_x_eager"], r["bare_x_eager"] = xe, xb
        print(
            f"{r['model']:<13} {r['option']:<28} {r['first_step_s']:>12.1f} "
            f"{r['end_to_end_samples_per_sec']:>8.1f} {xe:>8.2f} "
            f"{r['bare_step_samples_per_sec']:>8.1f} {xb:>8.2f}"
        )


def run_models(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    for model in args.models.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            code = _torchrun(args, ["--worker-model", model, "--worker-json", out.name])
            if code != 0:
                raise SystemExit(f"train_bench: {model} failed (exit {code})")
            rows += json.loads(Path(out.name).read_text())
    _print_models(rows)
    return rows


def run_demo(args: argparse.Namespace) -> list[dict]:
    """Whole `facetrain train` runs of the demo config, eager and as configured, alternated."""
    rows: list[dict] = []
    variants = args.demo_variants.split(",")
    for variant in variants:
        if variant not in DEMO_VARIANTS:
            raise SystemExit(
                f"--demo-variants: unknown {variant!r}; known: {', '.join(DEMO_VARIANTS)}"
            )
    with tempfile.TemporaryDirectory() as out:
        for pair, variant in itertools.product(range(args.demo), variants):
            sets = [*args.overrides, f"run.output_dir={out}", f"run.name={variant}{pair}"]
            sets += DEMO_VARIANTS[variant]
            sets += [f"train.max_steps={args.demo_steps}"] if args.demo_steps else []
            cmd = [sys.executable, "-m", "launcher.cli", "train", args.config]
            cmd += [x for s in sets for x in ("--set", s)]
            start = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            summary = json.loads((Path(out) / f"{variant}{pair}" / "summary.json").read_text())
            acc = {k: v["accuracy"] for k, v in summary.get("eval_after", {}).items()}
            row = {
                "variant": variant,
                "pair": pair,
                "wall_s": wall,
                "accuracy": acc,
                "samples_per_sec": summary["train"]["samples_per_sec"],
                "steps": summary["train"]["steps"],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        rate = statistics.median(r["samples_per_sec"] for r in mine)
        wall = statistics.median(r["wall_s"] for r in mine)
        print(f"demo {variant:<7} median samples/s {rate:8.1f}  median wall {wall:7.1f} s")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker_model:
        worker(args)
        return 0
    result = {
        "command": " ".join(["bench/train_bench.py", *(argv or sys.argv[1:])]),
        "nproc": args.nproc,
        "batch_per_rank": args.batch,
    }
    if args.demo:
        result["demo"] = run_demo(args)
    else:
        result["models"] = run_models(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
