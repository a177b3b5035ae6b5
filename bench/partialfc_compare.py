"""Partial FC against the system users would pick instead: our plain core, our fast CPU
backend and arcface_torch's ``PartialFC_V2``, side by side, with the bare matrix products.

For every (num_classes C, sample_rate) it spawns ``--world`` gloo processes. Each process
builds the three implementations in turn, with the head and optimizer a user gets from each:

- ``plain``: ``PartialFC`` (partialfc.backend: plain) + ArcFace + its row-sparse SGD;
- ``fast``: ``FusedPartialFC`` (partialfc.backend: cpu_fused) + ArcFace + its SGD;
- ``arcface_torch``: ``PartialFC_V2`` + ``CombinedMarginLoss(64, 1, 0.5, 0)`` +
  ``torch.optim.SGD`` (lr 0.1, momentum 0.9, weight decay 5e-4), as its ``train_v2.py``
  builds them, loaded by path from ``--anchor-dir`` with its ``.cuda()`` calls turned into
  the CPU (nothing else changed; see the anchor's SOURCE.md);

and times full steps (forward, backward, optimizer step) on a fixed batch of ``--batch``
embeddings per rank, each step followed by the bare matrix products of the same sampled
problem (see ``_measure.BareGemms``). The implementations take turns for
``--rounds`` rounds (one warm-up step, then timed pairs each turn; a module is rebuilt per
turn so that only one lives at a time), so every implementation sees the same load of a
shared machine. Reported per implementation: the median step time, the median of its
per-pair ratios to the bare products, and its ratio to arcface_torch's median step.

Peak memory is measured for each implementation in processes of its own (peak resident set
during two steps minus the resident size before the module was built, after a tiny run of
the same implementation), next to the state
that any implementation must hold: shard weights + momentum + gradient rows.

    .venv/bin/python bench/partialfc_compare.py --anchor-dir ../shared/anchors/arcface_torch

Prints a table and writes JSON (default bench/results/partialfc_compare.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import types
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as measure  # noqa: E402  (the benches' measuring helpers)

REPO = measure.REPO
IMPLS = ("plain", "fast", "arcface_torch")
STORAGE = {"plain_bf16": "bf16", "plain_fp16": "fp16"}
"""Further implementations ``--impls`` may name: the plain core with 16-bit class centres."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchor-dir", required=True, help="a checkout of arcface_torch")
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="embeddings per rank")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="turns of every implementation")
    p.add_argument("--pairs", type=int, default=2, help="timed (step, products) pairs a turn")
    p.add_argument("--threads", type=int, default=0, help="per rank; 0: cores // world")
    p.add_argument(
        "--impls", nargs="+", default=list(IMPLS), choices=[*IMPLS, *STORAGE],
        help="what to measure (plain_bf16 / plain_fp16: the plain core, 16-bit centres)",
    )  # fmt: skip
    p.add_argument("--memory-only", action="store_true", help="peak memory, no timings")
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "partialfc_compare.json"))
    return p.parse_args(argv)


def _load_anchor(anchor_dir: str) -> tuple[Any, Any]:
    """(PartialFC_V2, CombinedMarginLoss) from arcface_torch's files, ``.cuda()`` -> CPU."""
    modules = {}
    for name in ("partial_fc_v2", "losses"):
        source = Path(anchor_dir, f"{name}.py").read_text()
        module = types.ModuleType(f"arcface_torch_{name}")
        code = compile(source.replace(".cuda()", ".cpu()"), f"{anchor_dir}/{name}.py", "exec")
        exec(code, module.__dict__)  # noqa: S102 - the peer's own file, run as its authors wrote it
        modules[name] = module
    return modules["partial_fc_v2"].PartialFC_V2, modules["losses"].CombinedMarginLoss


class _Impl:
    """One implementation's module and optimizer, built for a config on this rank."""

    def __init__(self, name: str, cfg: dict[str, Any], rank: int) -> None:
        import torch

        from partialfc import build_margin, build_partial_fc

        c, d, rate, world = cfg["classes"], cfg["dim"], cfg["rate"], cfg["world"]
        if name == "arcface_torch":
            partial_fc_v2, combined = _load_anchor(cfg["anchor_dir"])
            self.module = partial_fc_v2(combined(64.0, 1.0, 0.5, 0.0), d, c, rate, False)
            self.opt = torch.optim.SGD(
                self.module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4
            )
        else:
            from partialfc.rounding import storage_dtype

            backend = "cpu_fused" if name == "fast" else "plain"
            self.module = build_partial_fc(
                backend, build_margin("arcface"), d, c, rate, rank, world, update="sampled",
                storage_dtype=storage_dtype(STORAGE.get(name, "fp32")),
            )  # fmt: skip
            self.opt = self.module.build_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.num_local = self.module.num_local

    def state_bytes(self) -> int:
        """What any implementation must hold, from this one's tensors after a step: the
        shard's weights, their optimizer state and the gradient rows (the dense shard's
        gradient for arcface_torch, the sampled rows' for ours)."""
        import torch

        weight = self.module.weight
        state = self.opt.state[weight]
        total = weight.nbytes + sum(t.nbytes for t in state.values() if torch.is_tensor(t))
        grad = weight.grad
        if grad is not None:
            total += grad._values().nbytes if grad.is_sparse else grad.nbytes
        return total

    def step(self, emb: Any, labels: Any) -> None:
        self.opt.zero_grad(set_to_none=True)
        emb.grad = None
        out = self.module(emb, labels.clone())  # arcface_torch squeezes its labels in place
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        self.opt.step()


def _rank_worker(rank: int, cfg: dict[str, Any], port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from partialfc.fast import cpu_kernels

    torch.set_num_threads(cfg["threads"])
    if not cpu_kernels.available():
        raise RuntimeError("the fused CPU kernels did not build; see the warning above")
    world = cfg["world"]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(minutes=30),
    )  # fmt: skip
    try:
        d, b = cfg["dim"], cfg["batch"]
        gen = torch.Generator().manual_seed(1000 + rank)
        emb = torch.randn(b, d, generator=gen).requires_grad_(True)
        labels = torch.randint(0, cfg["classes"], (b,), generator=gen)
        result = _memory(cfg, rank, emb, labels) if cfg["mode"] == "memory" else None
        if result is None:
            result = _timings(cfg, rank, emb, labels, dist.barrier)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _memory(cfg: dict[str, Any], rank: int, emb: Any, labels: Any) -> dict[str, Any]:
    """Peak resident memory of two steps of one implementation, above the start.

    As in partialfc_bench, a tiny run of the same implementation comes first, so that the
    code pages, thread pools and allocator arenas a step touches once are resident before
    the baseline is taken (they are not the classifier's memory)."""
    world = cfg["world"]
    tiny = _Impl(cfg["impl"], {**cfg, "classes": 64 * world}, rank)
    tiny.step(emb, labels % (64 * world))
    del tiny
    emb.grad = None
    gc.collect()
    base = measure.proc_status("VmRSS")
    if not measure.reset_peak_rss():
        raise RuntimeError("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    impl = _Impl(cfg["impl"], cfg, rank)
    for _ in range(2):
        impl.step(emb, labels)
    peak = measure.proc_status("VmHWM")
    return {"peak_bytes": peak - base, "state_bytes": impl.state_bytes(), "rows": impl.num_local}


def _timings(cfg: dict[str, Any], rank: int, emb: Any, labels: Any, barrier: Any) -> dict:
    """Rounds of (build, warm-up step, timed step/products pairs) per implementation."""
    import torch

    steps: dict[str, list[float]] = {name: [] for name in cfg["impls"]}
    ratios: dict[str, list[float]] = {name: [] for name in cfg["impls"]}
    s_r = None
    for _ in range(cfg["rounds"]):
        for name in cfg["impls"]:
            impl = _Impl(name, cfg, rank)
            impl.step(emb, labels)  # warm-up
            if s_r is None:  # the plain core's sampled rows (positives included)
                s_r = int(impl.module.last_sampled_global.numel())
            rows = (
                impl.module.weight.detach()
                if s_r == impl.num_local
                else torch.randn(s_r, cfg["dim"])
            )
            bare = measure.BareGemms(cfg["batch"] * cfg["world"], cfg["dim"], rows)
            for _ in range(cfg["pairs"]):
                t_step = measure.timed(lambda impl=impl: impl.step(emb, labels), barrier)
                impl.opt.zero_grad(set_to_none=True)
                bare.prepare()
                t_bare = measure.timed(bare, barrier)
                bare.release()
                steps[name].append(t_step)
                ratios[name].append(t_step / t_bare)
            del impl, bare, rows
            gc.collect()
    return {"steps": steps, "ratios": ratios, "num_sampled": s_r}


def _spawn(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _rank_worker, args=(cfg, measure.free_port(), out), nprocs=cfg["world"],
            start_method="spawn",
        )  # fmt: skip
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(cfg["world"])]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import os

    threads = args.threads or max(1, (os.cpu_count() or 2) // args.world)
    base = {
        "anchor_dir": str(Path(args.anchor_dir).resolve()), "dim": args.dim,
        "batch": args.batch, "world": args.world, "rounds": args.rounds, "pairs": args.pairs,
        "threads": threads, "impls": args.impls,
    }  # fmt: skip
    rows = []
    for classes in args.classes:
        for rate in args.rates:
            cfg = {**base, "classes": classes, "rate": rate, "mode": "time"}
            ranks = None
            if not args.memory_only:
                print(f"C={classes} rate={rate}: timing ...", flush=True)
                ranks = _spawn(cfg)
            row: dict[str, Any] = {"classes": classes, "rate": rate, "impls": {}}
            for name in args.impls:
                print(f"C={classes} rate={rate}: memory of {name} ...", flush=True)
                mem = _spawn({**cfg, "mode": "memory", "impl": name})
                peak = max(r["peak_bytes"] for r in mem)
                state = max(r["state_bytes"] for r in mem)
                row["impls"][name] = {
                    "peak_bytes": peak,
                    "peak_bytes_all_ranks": sum(r["peak_bytes"] for r in mem),
                    "state_bytes": state,
                    "state_bytes_per_identity": state / max(r["rows"] for r in mem),
                    "x_state": peak / state,
                }
            if ranks is not None:  # every rank times the same steps: rank 0's figures
                anchor = "arcface_torch" if "arcface_torch" in args.impls else args.impls[0]
                anchor_step = measure.median(ranks[0]["steps"][anchor])
                for name, entry in row["impls"].items():
                    step = measure.median(ranks[0]["steps"][name])
                    entry.update(
                        step_s=step,
                        step_s_all=ranks[0]["steps"][name],
                        x_gemm=measure.median(ranks[0]["ratios"][name]),
                        x_anchor=step / anchor_step,
                    )
                row["anchor"] = anchor
            rows.append(row)
    return rows


def _print(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nPartial FC vs arcface_torch PartialFC_V2, W={args.world}, D={args.dim}, "
        f"B={args.batch}/rank, CPU (gloo); medians of {args.rounds} x {args.pairs} pairs; "
        "x anchor: step / the anchor's (arcface_torch where measured)"
    )
    print(
        f"{'C':>9} {'rate':>5} {'impl':>14} {'step ms':>9} {'x GEMM':>7} {'x anchor':>8} "
        f"{'peak GiB':>9} {'x state':>8} {'B/identity':>10}"
    )
    for row in rows:
        for name, r in row["impls"].items():
            timed = "step_s" in r
            step = f"{1000 * r['step_s']:>9,.0f}" if timed else f"{'-':>9}"
            ratios = f"{r['x_gemm']:>7.2f} {r['x_anchor']:>8.2f}" if timed else f"{'-':>7} {'-':>8}"
            print(
                f"{row['classes']:>9} {row['rate']:>5} {name:>14} {step} {ratios} "
                f"{r['peak_bytes'] / measure.GIB:>9.2f} {r['x_state']:>8.2f} "
                f"{r['state_bytes_per_identity']:>10,.0f}"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rows = run(args)
    _print(rows, args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
