"""Partial FC's plain core, eager against ``torch.compile`` (inductor, ``dynamic=False``).

For every size (C classes, D, sample_rate) it spawns ``--world`` gloo processes; each builds
two identical ``PartialFC`` plain cores (ArcFace s=32 m2=0.3, ``update="sampled"`` with the
core's own ``ShardOptimizer``, the same seed) and compiles one of them as ``train.compile``
compiles the backbone (``torch.compile(module, dynamic=False)``). A step is forward, backward
and the optimizer step on ``--batch`` fresh random embeddings per rank and one fixed batch of
labels: compile's best case, the other graphs' shapes never change. ``--fresh-labels`` draws
labels every step as training does: then the positives' count and the target rows' count
change the shapes of most graphs from step to step, and a static compile compiles again
(``graphs``) until dynamo's recompile limit sends those frames back to eager. Both modules get
the same inputs in the same order, so their losses must agree step by step (the max abs
difference is reported). Rounds alternate the two (``--steps`` eager steps, then as many
compiled ones) after ``--warmup`` steps each: the compile, then the recompiles of the frame of
``sampling._largest_sorted`` whose candidates' count is random, until dynamo's recompile
limit (8) sends that frame back to eager. Figures are medians over the rounds, the ratio the
median per-round ratio.

Graph breaks are counted by ``torch._dynamo.explain`` on a third module (one forward), and
the graphs the compiled module compiled in the run by dynamo's counters.

    .venv/bin/python bench/partialfc_compile_bench.py
    .venv/bin/python bench/partialfc_compile_bench.py --sizes 1000:128:0.5 --rounds 3

Prints a table and writes JSON (default bench/results/partialfc_compile_bench.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from _measure import REPO, free_port, timed, write_result  # bench/ is sys.path[0]

HEAD = {"s": 32.0, "m2": 0.3}  # configs/demo_cpu.yaml's ArcFace


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        nargs="+",
        default=["1000:128:0.5", "100000:512:0.1"],
        help="classes:dim:sample_rate (the demo's, a larger one)",
    )
    p.add_argument("--batch", type=int, default=64, help="embeddings per rank")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="per rank")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=12, help="untimed steps first (compiles)")
    p.add_argument("--fresh-labels", action="store_true", help="new labels every step")
    p.add_argument("--json", default=str(REPO / "bench/results/partialfc_compile_bench.json"))
    return p.parse_args(argv)


def _build(cfg: dict[str, Any], rank: int) -> tuple[Any, Any]:
    from partialfc import build_margin, build_partial_fc

    pfc = build_partial_fc(
        "plain", build_margin("arcface", **HEAD), cfg["dim"], cfg["classes"], cfg["rate"],
        rank, cfg["world"], seed=0, update="sampled",
    )  # fmt: skip
    return pfc, pfc.build_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)


class _Runner:
    """One variant's module, optimizer and input stream (step i: the same inputs for both)."""

    def __init__(self, model: Any, opt: Any, cfg: dict[str, Any], rank: int) -> None:
        self.model, self.opt, self.cfg, self.rank = model, opt, cfg, rank
        self.losses: list[float] = []

    def _inputs(self, i: int) -> tuple[Any, Any]:
        import torch

        gen = torch.Generator().manual_seed(1000 * i + self.rank)
        b = self.cfg["batch"]
        emb = torch.randn(b, self.cfg["dim"], generator=gen).requires_grad_(True)
        if not self.cfg["fresh_labels"]:
            gen.manual_seed(self.rank)
        return emb, torch.randint(0, self.cfg["classes"], (b,), generator=gen)

    def step(self) -> None:
        emb, labels = self._inputs(len(self.losses))
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.model(emb, labels)
        loss.backward()
        self.opt.step()
        self.losses.append(float(loss.detach()))

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()


def _worker(rank: int, cfg: dict[str, Any], port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg["world"],
        timeout=timedelta(minutes=30),
    )  # fmt: skip
    try:
        import torch._dynamo

        probe = _Runner(*_build(cfg, rank), cfg, rank)
        emb, labels = probe._inputs(0)
        explain = torch._dynamo.explain(probe.model)(emb, labels)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        eager = _Runner(*_build(cfg, rank), cfg, rank)
        pfc, opt = _build(cfg, rank)
        comp = _Runner(torch.compile(pfc, dynamic=False), opt, cfg, rank)
        first = {}
        for name, run in (("eager", eager), ("compiled", comp)):
            t0 = time.perf_counter()
            run.steps(cfg["warmup"])
            first[name] = time.perf_counter() - t0
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(cfg["rounds"]):
            for name, run in (("eager", eager), ("compiled", comp)):
                sec = timed(lambda run=run: run.steps(cfg["steps"]), dist.barrier)
                times[name].append(sec / cfg["steps"])
        diffs = [abs(a - b) for a, b in zip(eager.losses, comp.losses, strict=True)]
        counters = torch._dynamo.utils.counters
        result = {
            "rank": rank,
            "times": times,
            "warmup_s": first,
            "loss_max_abs_diff": max(diffs),
            "loss_first_abs_diff": diffs[0],
            "loss_first": eager.losses[0],
            "loss_last": eager.losses[-1],
            "graph_count": explain.graph_count,
            "graph_break_count": explain.graph_break_count,
            "break_reasons": sorted({str(r.reason).splitlines()[0] for r in explain.break_reasons}),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(cfg, free_port(), tmp), nprocs=cfg["world"], join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(cfg["world"])]
    # The step ends on every rank (timed's barriers): rank 0's figures are the step's.
    t = ranks[0]["times"]
    ratios = [e / c for e, c in zip(t["eager"], t["compiled"], strict=True)]
    return {
        **cfg,
        "eager_ms": 1e3 * statistics.median(t["eager"]),
        "compiled_ms": 1e3 * statistics.median(t["compiled"]),
        "ratio": statistics.median(ratios),
        "compile_warmup_s": max(r["warmup_s"]["compiled"] for r in ranks),
        "loss_max_abs_diff": max(r["loss_max_abs_diff"] for r in ranks),
        "graph_breaks": max(r["graph_break_count"] for r in ranks),
        "unique_graphs": max(r["unique_graphs"] for r in ranks),
        "ranks": ranks,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rows = []
    for size in args.sizes:
        classes, dim, rate = size.split(":")
        cfg = {
            "classes": int(classes), "dim": int(dim), "rate": float(rate),
            "batch": args.batch, "world": args.world, "threads": args.threads,
            "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
            "fresh_labels": args.fresh_labels,
        }  # fmt: skip
        print(f"running C={classes} D={dim} rate={rate} ...", flush=True)
        rows.append(_run(cfg))
    print(
        f"\n{'C':>7} {'D':>4} {'rate':>5} {'eager ms':>9} {'compiled ms':>12} {'x eager':>8} "
        f"{'warmup s':>9} "
        f"{'breaks':>7} {'graphs':>7} {'loss diff':>10}"
    )
    for r in rows:
        print(
            f"{r['classes']:>7} {r['dim']:>4} {r['rate']:>5} {r['eager_ms']:>9.2f} "
            f"{r['compiled_ms']:>12.2f} {r['ratio']:>8.2f} {r['compile_warmup_s']:>9.1f} "
            f"{r['graph_breaks']:>7} "
            f"{r['unique_graphs']:>7} {r['loss_max_abs_diff']:>10.2e}"
        )
    for r in rows:
        print(f"break reasons (C={r['classes']}, rank 0):")
        for reason in r["ranks"][0]["break_reasons"]:
            print(f"  - {reason}")
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    write_result(args.json, {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
