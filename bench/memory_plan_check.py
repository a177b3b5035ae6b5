"""The memory planner against real training runs: model total vs measured peak per rank.

For each configuration (C, sample rate, W, storage dtype, batch, backbone, ...) it runs
``facetrain train`` for a few steps on this machine's CPU, W processes started here as a
launcher starts them (RANK / WORLD_SIZE / MASTER_ADDR in the environment, one process per
rank, so each rank's own peak is known), and reads every rank's peak resident set size from
``wait4`` (``ru_maxrss``: the whole process lifetime, start-up and the final checkpoint
included). The same config goes through the planner (``trainer.memory_plan``, as
``facetrain train --dry-run`` prints it) and the two are compared.

The class count is the pack's: each configuration trains on a pack of a few hundred real
(synthetic-face) images whose ``property`` file declares C classes (plain layout, labels in
``[0, 64)``). The trainer sizes the classifier, its optimizer state and the sampled rows
from the declared C, as for a real dataset of C identities; only the positives per step are
fewer than in a dataset where every image is another identity (at most N per step, which
the planner allows for). Verification sets, ONNX export and wandb are off (not part of the
training step; one configuration evaluates a set); data.workers is 0 so that the loader's
memory is the rank's own.

    .venv/bin/python bench/memory_plan_check.py                 # the table in BENCHMARKS.md
    .venv/bin/python bench/memory_plan_check.py --only 0 3 --steps 3

Prints a table and writes JSON (default bench/results/memory_plan_check.json).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as measure  # noqa: E402  (the benches' measuring helpers)
from _measure import write_result  # noqa: E402

REPO = measure.REPO
GIB = 2**30
IMAGES, LABELS = 256, 64
GOAL = 0.15

# name: (classes, sample_rate, world, storage dtype, batch per rank, backbone, extra --set)
CONFIGS: list[dict[str, Any]] = [
    {"classes": 200_000, "rate": 1.0, "world": 1, "dtype": "fp32", "batch": 64},
    {"classes": 400_000, "rate": 0.1, "world": 1, "dtype": "fp32", "batch": 128,
     "sets": ["partialfc.backend=plain"]},
    {"classes": 1_000_000, "rate": 0.1, "world": 2, "dtype": "bf16", "batch": 64},
    {"classes": 2_000_000, "rate": 0.1, "world": 2, "dtype": "bf16", "batch": 32},
    {"classes": 500_000, "rate": 1.0, "world": 2, "dtype": "bf16", "batch": 32},
    {"classes": 200_000, "rate": 0.1, "world": 2, "dtype": "fp32", "batch": 32,
     "backbone": "iresnet50"},
    {"classes": 600_000, "rate": 0.2, "world": 2, "dtype": "fp32", "batch": 64,
     "sets": ["train.precision=bf16"]},
    {"classes": 500_000, "rate": 0.5, "world": 1, "dtype": "bf16", "batch": 64,
     "sets": ["optimizer.name=adamw"]},
    {"classes": 300_000, "rate": 0.3, "world": 1, "dtype": "fp32", "batch": 64,
     "val": "data/demo/val.bin"},
    # Held out: not looked at when HEAP_RETENTION was chosen (see BENCHMARKS.md).
    {"classes": 1_500_000, "rate": 0.05, "world": 2, "dtype": "bf16", "batch": 32,
     "backbone": "iresnet18"},
    {"classes": 600_000, "rate": 0.05, "world": 2, "dtype": "fp32", "batch": 48,
     "sets": ["optimizer.name=adamw"]},
]  # fmt: skip
"""Configurations with ``val`` evaluate that set at the start and the end (its decoded images
are part of the plan); skipped where it is missing (``make demo`` writes it)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", type=int, nargs="*", default=None, help="indices of CONFIGS")
    p.add_argument("--steps", type=int, default=8, help="training steps per run")
    p.add_argument("--backbone", default="mobilefacenet", help="unless a config names one")
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "memory_plan_check.json"))
    return p.parse_args(argv)


def _write_pack(folder: Path, classes: int) -> None:
    """IMAGES synthetic faces (labels i % LABELS), the property declaring ``classes``."""
    from dataio.packer import write_pack
    from dataio.synth import FaceGenerator, encode_image

    gen = FaceGenerator()
    samples = [(i % LABELS, encode_image(gen, 0, i % LABELS, i // LABELS)) for i in range(IMAGES)]
    write_pack(folder, samples, classes, (112, 112), with_header=False)


def _config_text(cfg: dict[str, Any], pack: Path, out: Path, steps: int) -> list[str]:
    """The run's ``--set`` overrides of configs/demo_cpu.yaml."""
    return [
        f"data.train={pack}",
        "data.val=[]",
        "data.workers=0",
        f"run.output_dir={out}",
        "run.name=check",
        f"model.backbone={cfg['backbone']}",
        "model.embedding_size=512",
        "partialfc.margin={name: arcface}",
        f"partialfc.sample_rate={cfg['rate']}",
        f"partialfc.storage_dtype={cfg['dtype']}",
        f"train.batch_size={cfg['batch']}",
        f"train.max_steps={steps}",
        "train.eval_at_start=false",
        "train.log_every=1",
        "train.progress=false",
        "train.histogram_every=0",
        f"dist.nproc={cfg['world']}",
        "wandb.mode=disabled",
        "export.onnx=false",
        # The float32 contiguous step the table was measured with (the recipe's is bf16 +
        # channels-last since 2026-12-07); a configuration's "sets" name anything else.
        "train.precision=fp32",
        "train.channels_last=false",
        *cfg.get("sets", []),
    ]


def _run_ranks(sets: list[str], world: int, log: Path) -> list[int]:
    """``facetrain train`` as ``world`` ranks started here; each rank's peak RSS (bytes)."""
    port = measure.free_port()
    cmd = [sys.executable, "-m", "launcher.cli", "train", str(REPO / "configs" / "demo_cpu.yaml")]
    for item in sets:
        cmd += ["--set", item]
    procs = []
    with log.open("w") as sink:
        for rank in range(world):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=sink))
        peaks = {}
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            peaks[proc.pid] = usage.ru_maxrss * 1024  # kB on Linux
    failed = [p.returncode for p in procs if p.returncode]
    if failed:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"training failed (exit {failed}): " + " | ".join(tail))
    return [peaks[p.pid] for p in procs]


def _plan(sets: list[str], world: int) -> tuple[Any, Any]:
    from trainer.config import load_config
    from trainer.memory_plan import plan_memory
    from trainer.memory_report import memory_facts
    from trainer.plan import pack_facts

    config = load_config(REPO / "configs" / "demo_cpu.yaml", sets)
    facts = memory_facts(config, pack_facts(config).as_dict(), "cpu")
    return plan_memory(config, world, facts), facts


def _check(cfg: dict[str, Any], steps: int, tmp: Path) -> dict[str, Any]:
    pack = tmp / f"pack_{cfg['classes']}"
    if not pack.is_dir():
        _write_pack(pack, cfg["classes"])
    out = tmp / "runs"
    sets = _config_text(cfg, pack, out, steps)
    if "val" in cfg:
        if not (REPO / cfg["val"]).is_file():
            return {**cfg, "status": f"skipped: no {cfg['val']} (make demo)"}
        sets += [f"data.val=[{REPO / cfg['val']}]", "train.eval_at_start=true"]
    plan, facts = _plan(sets, cfg["world"])
    avail = measure.available_bytes()
    if avail and cfg["world"] * plan.total > 0.8 * avail:
        return {**cfg, "status": f"skipped: needs ~{cfg['world'] * plan.total / GIB:.1f} GiB"}
    start = time.perf_counter()
    peaks = _run_ranks(sets, cfg["world"], tmp / "train.log")
    seconds = time.perf_counter() - start
    subprocess.run(["rm", "-rf", str(out)], check=True)
    measured = max(peaks)
    terms = {
        k: getattr(plan, k)
        for k in (
            "classifier_state",
            "classifier_step",
            "backbone",
            "activations",
            "heap_slack",
            "baseline",
            "eval_sets",
        )
    }
    return {
        **cfg,
        "status": "ok",
        "backend": plan.backend,
        "sampled_per_rank": plan.sampled_per_rank,
        "model_terms_bytes": terms,
        "model_total_bytes": plan.total,
        "measured_peak_bytes_per_rank": peaks,
        "error": plan.total / measured - 1,
        "seconds": round(seconds, 1),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'C':>9} {'rate':>5} {'W':>2} {'dtype':>5} {'batch':>5} {'backbone':>13} {'backend':>9} "
        f"{'state':>6} {'step':>6} {'bbone':>6} {'activ':>6} {'slack':>5} {'base':>5} {'eval':>5} "
        f"{'model GiB':>9} {'measured GiB':>12} {'error':>7}"
    )
    for r in rows:
        head = (
            f"{r['classes']:>9} {r['rate']:>5} {r['world']:>2} {r['dtype']:>5} {r['batch']:>5} "
            f"{r['backbone']:>13}"
        )
        if r["status"] != "ok":
            print(f"{head}  {r['status']}")
            continue
        t = {k: v / GIB for k, v in r["model_terms_bytes"].items()}
        measured = " / ".join(f"{m / GIB:.2f}" for m in r["measured_peak_bytes_per_rank"])
        print(
            f"{head} {r['backend']:>9} {t['classifier_state']:>6.2f} {t['classifier_step']:>6.2f} "
            f"{t['backbone']:>6.2f} {t['activations']:>6.2f} {t['heap_slack']:>5.2f} "
            f"{t['baseline']:>5.2f} {t['eval_sets']:>5.2f} "
            f"{r['model_total_bytes'] / GIB:>9.2f} {measured:>12} {100 * r['error']:>+6.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    indices = args.only if args.only is not None else range(len(CONFIGS))
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory_plan_check_") as tmp:
        for i in indices:
            cfg = {"backbone": args.backbone, **CONFIGS[i], "sets": CONFIGS[i].get("sets", [])}
            print(f"[{i}] {cfg} ...", flush=True)
            rows.append(_check(cfg, args.steps, Path(tmp)))
            print(f"    {rows[-1].get('error', rows[-1]['status'])}", flush=True)
    print()
    _print_table(rows)
    errors = [abs(r["error"]) for r in rows if r["status"] == "ok"]
    worst = max(errors, default=0.0)
    print(f"\nlargest |error| {100 * worst:.1f}% (goal: within {100 * GOAL:.0f}%)")
    result = {
        "command": " ".join(["bench/memory_plan_check.py", *(argv or sys.argv[1:])]),
        "steps": args.steps,
        "max_rss_note": "peak resident set size of each rank's process (wait4 ru_maxrss)",
        "largest_abs_error": worst,
        "goal": GOAL,
        "runs": rows,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
