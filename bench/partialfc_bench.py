"""Partial FC step cost: time and memory per rank against the bare matrix products.

For every (num_classes C, sample_rate, update mode) it spawns ``--world`` gloo processes on
this machine; each builds ``PartialFC`` (ArcFace head by default) with its optimizer and times
full steps (forward + backward + optimizer step) on a fixed random batch of ``--batch``
embeddings per rank. In the same processes it times the bare matrix products of the same
sampled problem (``[N, D] x [D, S]``, ``[N, S] x [S, D]``, ``[S, N] x [N, D]`` into
preallocated outputs, N = batch * world, S = sampled rows): the lower bound of any
implementation. Steps and bare products alternate (step, products, step, ...) so that both
see the same load on a shared machine; the ratio is the median of the per-pair ratios.

Peak memory per rank is the peak resident set size during the first classifier steps minus
the resident size before the classifier was built (after a tiny warm-up run of the same
code), next to the model's irreducible state: shard weights + optimizer state + gradient
(dense: the whole shard; sampled: the sampled rows). A single-process dense full-softmax
classifier (plain autograd, ``torch.optim.SGD``) over all C classes and the global batch is
timed as the baseline, when it fits in memory.

    .venv/bin/python bench/partialfc_bench.py                       # the full table
    .venv/bin/python bench/partialfc_bench.py --classes 100000 --rates 0.1 --steps 3

Prints a table and writes JSON (default bench/results/partialfc_bench.json). Configurations
that would not fit in the available memory are reported as such, not run.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from _measure import (  # bench/ is sys.path[0] when a bench runs
    GIB,
    REPO,
    BareGemms,
    available_bytes,
    free_port,
    median,
    proc_status,
    reset_peak_rss,
    timed,
    write_result,
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument(
        "--updates", nargs="+", default=["sampled", "dense"], choices=["sampled", "dense"]
    )
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="embeddings per rank")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--head", default="arcface")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="per rank; 0: cores // world")
    p.add_argument("--no-baseline", action="store_true", help="skip the dense single process")
    p.add_argument(
        "--backend",
        default="cpu_fused",
        choices=["cpu_fused", "plain"],
        help="the fast CPU backend (default) or the plain core (what a GPU runs)",
    )
    p.add_argument(
        "--no-cpu-kernels",
        action="store_true",
        help="the fast backend on torch ops instead of its fused CPU kernels",
    )
    p.add_argument(
        "--thp",
        action="store_true",
        help="THP_MEM_ALLOC_ENABLE=1 for the workers (huge pages for big tensors)",
    )
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "partialfc_bench.json"))
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- memory
# ----------------------------------------------------------------------------- estimates
def _state_bytes(rows: int, dim: int, optimizer: str, grad_rows: int) -> int:
    """Shard weights + optimizer state + gradient, float32."""
    opt = 2 if optimizer == "adamw" else 1
    return 4 * dim * (rows * (1 + opt) + grad_rows)


def _need_sharded(cfg: dict[str, Any]) -> int:
    c_r = math.ceil(cfg["classes"] / cfg["world"])
    s = c_r if cfg["rate"] >= 1 else max(round(cfg["rate"] * c_r), 1)
    n = cfg["batch"] * cfg["world"]
    grad_rows = c_r if cfg["update"] == "dense" else s
    per_rank = _state_bytes(c_r, cfg["dim"], cfg["optimizer"], grad_rows)
    gathered = s * cfg["dim"] if cfg["rate"] < 1 else 0  # the sampled rows' buffer
    per_rank += 4 * (gathered + n * s) + 600 * 2**20  # rows, logits, interpreter
    if cfg["update"] == "dense":
        per_rank += 4 * c_r * cfg["dim"]  # torch.optim's shard-sized temporary
    bare = 4 * (s * cfg["dim"] + 2 * n * s)  # the bare products' operands
    return cfg["world"] * max(per_rank, bare + 600 * 2**20)


def _need_dense(classes: int, dim: int, n: int) -> int:
    # W, grad, momentum, normalised W, cosine/logits/softmax/grad [N, C], interpreter.
    return 4 * classes * dim * 4 + 4 * n * classes * 4 + 800 * 2**20


# ----------------------------------------------------------------------------- workers
def _run_steps(
    pfc: Any, opt: Any, emb: Any, labels: Any, cfg: dict[str, Any], barrier: Any
) -> tuple[list[float], dict[str, Any]]:
    """Warm-up, then timed full steps (forward, backward, optimizer); (seconds, last stats)."""
    stats: Any = None

    def step() -> None:
        nonlocal stats
        opt.zero_grad(set_to_none=True)
        emb.grad = None
        loss, stats = pfc(emb, labels)
        loss.backward()
        opt.step()

    for _ in range(cfg["warmup"]):
        step()
    times = [timed(step, barrier) for _ in range(cfg["steps"])]
    return times, stats


def _paired_times(
    pfc: Any, opt: Any, emb: Any, labels: Any, bare: BareGemms, pairs: int, barrier: Any
) -> tuple[list[float], list[float]]:
    """Alternate one full step and one set of bare products, so that both see the same load
    on a shared machine; returns (step seconds, bare seconds), pair by pair."""
    steps, bares = [], []
    cfg = {"warmup": 0, "steps": 1}
    for _ in range(pairs):
        steps.append(_run_steps(pfc, opt, emb, labels, cfg, barrier)[0][0])
        opt.zero_grad(set_to_none=True)
        bare.prepare()
        bares.append(timed(bare, barrier))
        bare.release()
    return steps, bares


def _optimizer(pfc: Any, cfg: dict[str, Any]) -> Any:
    """The shard optimizer for the update mode: PartialFC's own for "sampled", torch's for
    "dense" (what a trainer builds with ``torch.optim`` over ``pfc.parameters()``)."""
    import torch

    hp = {"lr": 0.1, "weight_decay": 5e-4}
    if cfg["update"] == "sampled":
        return pfc.build_optimizer(cfg["optimizer"], momentum=0.9, **hp)
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(pfc.parameters(), momentum=0.9, **hp)
    return torch.optim.AdamW(pfc.parameters(), **hp)


def _rank_worker(rank: int, cfg: dict[str, Any], port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    from partialfc import build_margin, build_partial_fc
    from partialfc.fast import cpu_kernels

    torch.set_num_threads(cfg["threads"])
    cpu_kernels.set_enabled(cfg["cpu_kernels"])
    if cfg["cpu_kernels"] and not cpu_kernels.available():
        raise RuntimeError("the fused CPU kernels did not build; see the warning above")
    world = cfg["world"]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=30),
    )
    try:
        d, b = cfg["dim"], cfg["batch"]
        gen = torch.Generator().manual_seed(1000 + rank)
        emb = torch.randn(b, d, generator=gen).requires_grad_(True)
        labels = torch.randint(0, cfg["classes"], (b,), generator=gen)
        # A tiny run of the same code first, so that pages of code and allocator arenas the
        # step touches once are resident before the baseline is taken.
        tiny_cfg = {**cfg, "warmup": 1, "steps": 1}
        tiny = build_partial_fc(
            cfg["backend"], build_margin(cfg["head"]), d, 4 * world, 0.5, rank, world,
            update=cfg["update"],
        )  # fmt: skip
        tiny_opt = _optimizer(tiny, cfg)
        _run_steps(tiny, tiny_opt, emb, labels % (4 * world), tiny_cfg, dist.barrier)
        del tiny, tiny_opt
        emb.grad = None
        dist.barrier()
        gc.collect()
        base_rss = proc_status("VmRSS")
        peak_reset = reset_peak_rss()
        pfc = build_partial_fc(
            cfg["backend"],
            build_margin(cfg["head"]),
            embedding_size=d,
            num_classes=cfg["classes"],
            sample_rate=cfg["rate"],
            rank=rank,
            world_size=world,
            seed=0,
            update=cfg["update"],
        )
        opt = _optimizer(pfc, cfg)
        times, stats = _run_steps(pfc, opt, emb, labels, cfg, dist.barrier)
        peak = (
            proc_status("VmHWM")
            if peak_reset
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        s = int(stats.num_sampled)
        c_r = pfc.num_local
        grad_rows = c_r if cfg["update"] == "dense" else s
        opt.zero_grad(set_to_none=True)
        rows = pfc.weight.detach() if s == c_r else torch.randn(s, d)
        bare = BareGemms(b * world, d, rows)
        bare.prepare()
        bare()  # warm-up
        bare.release()
        # Enough pairs for ~10 s of measurement (at least --steps), at most 30.
        pairs_t = torch.tensor([max(cfg["steps"], min(30, int(10.0 / max(min(times), 1e-3))))])
        dist.all_reduce(pairs_t, op=dist.ReduceOp.MIN)  # every rank must run the same count
        pairs = int(pairs_t.item())
        step_times, bare_times = _paired_times(pfc, opt, emb, labels, bare, pairs, dist.barrier)
        ratios = sorted(a / b_ for a, b_ in zip(step_times, bare_times, strict=True))
        result = {
            "rank": rank,
            "num_local": c_r,
            "num_sampled": s,
            "step_s": median(step_times),
            "step_s_all": times + step_times,
            "bare_gemm_s": median(bare_times),
            "bare_gemm_s_all": bare_times,
            "time_ratio_paired": ratios[len(ratios) // 2],
            "peak_bytes": peak - base_rss,
            "state_bytes": _state_bytes(c_r, d, cfg["optimizer"], grad_rows),
            "peak_rss_bytes": peak,
            "base_rss_bytes": base_rss,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _dense_steps(init: Any, head: Any, x: Any, labels: Any, cfg: dict[str, Any]) -> list[float]:
    """Timed steps of the plain dense classifier (autograd, torch.optim.SGD)."""
    import torch
    import torch.nn.functional as F

    weight = torch.nn.Parameter(init)
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        cos = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T  # [N, C]
        loss = F.cross_entropy(head(cos, labels), labels)
        loss.backward()
        opt.step()

    for _ in range(cfg["warmup"]):
        step()
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _dense_worker(cfg: dict[str, Any], out_path: str) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from partialfc import build_margin, init_class_centers

    torch.set_num_threads(cfg["threads"])
    c, d, n = cfg["classes"], cfg["dim"], cfg["batch"] * cfg["world"]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, generator=gen).requires_grad_(True)
    labels = torch.randint(0, c, (n,), generator=gen)
    head = build_margin(cfg["head"])
    _dense_steps(torch.randn(8, d), head, x, labels % 8, {**cfg, "warmup": 1, "steps": 1})
    x.grad = None
    gc.collect()
    base_rss = proc_status("VmRSS")
    peak_reset = reset_peak_rss()
    times = _dense_steps(init_class_centers(0, c, d, seed=0), head, x, labels, cfg)
    peak = proc_status("VmHWM") if peak_reset else 0
    Path(out_path).write_text(
        json.dumps(
            {
                "step_s": sorted(times)[len(times) // 2],
                "step_s_all": times,
                "peak_bytes": peak - base_rss,
                "state_bytes": _state_bytes(c, d, "sgd", c),
            }
        )
    )


def _run_sharded(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.multiprocessing as mp

    need, avail = _need_sharded(cfg), available_bytes()
    if avail and need > 0.92 * avail:
        return {
            **cfg,
            "status": f"does not fit: needs ~{need / GIB:.1f} GiB, {avail / GIB:.1f} GiB available",
        }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_rank_worker, args=(cfg, free_port(), tmp), nprocs=cfg["world"], join=True)
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as exc:  # e.g. OOM kill
            first = str(exc).strip().splitlines()[0]
            return {**cfg, "status": f"failed: {first} (out of memory?)"}
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(cfg["world"])]
    step = max(r["step_s"] for r in ranks)
    bare = max(r["bare_gemm_s"] for r in ranks)
    ratio = max(r["time_ratio_paired"] for r in ranks)
    peak = max(r["peak_bytes"] for r in ranks)
    state = max(r["state_bytes"] for r in ranks)
    return {
        **cfg,
        "status": "ok",
        "num_sampled_per_rank": max(r["num_sampled"] for r in ranks),
        "step_s": step,
        "bare_gemm_s": bare,
        "time_ratio": ratio,
        "peak_bytes_per_rank": peak,
        "state_bytes_per_rank": state,
        "memory_ratio": peak / state,
        "ranks": ranks,
    }


def _run_dense(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.multiprocessing as mp

    need = _need_dense(cfg["classes"], cfg["dim"], cfg["batch"] * cfg["world"])
    avail = available_bytes()
    if avail and need > 0.92 * avail:
        return {
            **cfg,
            "status": f"does not fit: needs ~{need / GIB:.1f} GiB, {avail / GIB:.1f} GiB available",
        }
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "dense.json"))
        ctx = mp.get_context("spawn")
        proc = ctx.Process(target=_dense_worker, args=(cfg, out))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            return {**cfg, "status": f"failed (exit code {proc.exitcode})"}
        res = json.loads(Path(out).read_text())
    return {**cfg, "status": "ok", **res, "memory_ratio": res["peak_bytes"] / res["state_bytes"]}


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:,.0f}"


def _print_table(rows: list[dict[str, Any]], dense: list[dict[str, Any]]) -> None:
    if rows:
        path = "fused CPU kernels" if rows[0]["cpu_kernels"] else "torch ops (no CPU kernels)"
        if rows[0]["backend"] == "plain":
            path = "plain core"
        print(f"Partial FC, {rows[0]['world']} ranks, {path}:")
    print(
        f"{'C':>9} {'rate':>5} {'update':>7} {'S/rank':>8} {'step ms':>9} {'GEMM ms':>9} "
        f"{'x GEMM':>7} {'peak GiB':>9} {'state GiB':>9} {'x state':>8}"
    )
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['classes']:>9} {r['rate']:>5} {r['update']:>7}  {r['status']}")
            continue
        print(
            f"{r['classes']:>9} {r['rate']:>5} {r['update']:>7} {r['num_sampled_per_rank']:>8} "
            f"{_fmt_ms(r['step_s']):>9} {_fmt_ms(r['bare_gemm_s']):>9} "
            f"{r['time_ratio']:>7.2f} {r['peak_bytes_per_rank'] / GIB:>9.2f} "
            f"{r['state_bytes_per_rank'] / GIB:>9.2f} {r['memory_ratio']:>8.2f}"
        )
    if dense:
        print("\nsingle-process dense full softmax (all classes, global batch, plain autograd):")
        print(f"{'C':>9} {'step ms':>9} {'peak GiB':>9} {'state GiB':>9}")
        for r in dense:
            if r["status"] != "ok":
                print(f"{r['classes']:>9}  {r['status']}")
                continue
            print(
                f"{r['classes']:>9} {_fmt_ms(r['step_s']):>9} {r['peak_bytes'] / GIB:>9.2f} "
                f"{r['state_bytes'] / GIB:>9.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.thp:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # inherited by the spawned workers
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.world)
    base = {
        "dim": args.dim,
        "batch": args.batch,
        "world": args.world,
        "head": args.head,
        "optimizer": args.optimizer,
        "warmup": args.warmup,
        "steps": args.steps,
        "threads": threads,
        "backend": args.backend,
        "cpu_kernels": args.backend == "cpu_fused" and not args.no_cpu_kernels,
    }
    rows: list[dict[str, Any]] = []
    dense: list[dict[str, Any]] = []
    for classes in args.classes:
        for rate in args.rates:
            for update in args.updates:
                cfg = {**base, "classes": classes, "rate": rate, "update": update}
                print(f"running C={classes} rate={rate} update={update} ...", flush=True)
                rows.append(_run_sharded(cfg))
        if not args.no_baseline:
            cfg = {**base, "classes": classes, "threads": max(1, cores)}
            print(f"running dense single-process baseline C={classes} ...", flush=True)
            dense.append(_run_dense(cfg))
    print()
    _print_table(rows, dense)
    result = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "cores": cores,
        "thp": args.thp,
        "sharded": rows,
        "dense_baseline": dense,
    }
    write_result(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
