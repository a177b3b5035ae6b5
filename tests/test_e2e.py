"""End to end: `facetrain train` under torchrun with 2 gloo processes, then eval and export."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import create_backbone
from evaluation.wandb_offline import find_run_log, read_history

REPO = Path(__file__).resolve().parents[1]

# A training run and the tools on it, each a few processes: on a loaded 2-core machine one run
# can take minutes, so the subprocess and per-test limits are generous (a hang still ends).
pytestmark = pytest.mark.timeout(2400)


def _facetrain(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"facetrain {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def trained_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("e2e")
    proc = _facetrain(
        "train",
        str(REPO / "configs" / "demo_cpu.yaml"),
        "--set",
        f"data.train={tiny_dataset / 'train'}",
        "--set",
        f"data.val=[{tiny_dataset / 'val.bin'}]",
        "--set",
        f"run.output_dir={work}",
        "--set",
        "run.name=e2e",
        "--set",
        "data.workers=0",
        "--set",
        "train.batch_size=4",  # 24 images / (2 ranks x 4) = 3 steps per epoch
        "--set",
        "train.max_steps=5",  # crosses an epoch boundary
        "--set",
        "train.log_every=2",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.keep_checkpoints=2",
        "--set",
        "schedule.warmup_steps=2",
        "--set",
        "eval.batch_size=16",
        "--set",
        "train.eval_every=4",  # mid-run evaluation: every rank embeds a slice
        "--set",
        "train.histogram_every=2",
        cwd=work,
    )
    return {"run_dir": work / "e2e", "stdout": proc.stdout, "stderr": proc.stderr, "work": work}


def test_two_process_run_prints_summary(trained_run: dict) -> None:
    out = trained_run["stdout"]
    assert "starting 2 processes under torchrun" in out
    assert "facetrain summary" in out
    assert "raw-pixel cosine baseline" in out and "before training" in out
    # no torch / onnx noise on the console: torchrun's OMP_NUM_THREADS banner, the exporter's
    # warnings (opset 18 needs no down-conversion)
    err = trained_run["stderr"]
    assert "OMP_NUM_THREADS" not in err and "Warning" not in err and "torchvision" not in err, err


def test_summary_json(trained_run: dict) -> None:
    summary = json.loads((trained_run["run_dir"] / "summary.json").read_text())
    assert summary["derived"]["world_size"] == 2
    assert summary["derived"]["num_classes"] == 6  # read from the pack, not the config
    assert summary["derived"]["steps_per_epoch"] == 3
    assert summary["train"]["steps"] == 5
    for key in ("eval_before", "eval_after"):
        assert 0.0 <= summary[key]["val"]["accuracy"] <= 1.0
    assert summary["onnx"]["max_abs_diff"] < 1e-4
    assert Path(summary["onnx"]["path"]).is_file()


def test_checkpoint_holds_every_shard(trained_run: dict) -> None:
    run_dir = trained_run["run_dir"]
    steps = sorted(p.name for p in run_dir.glob("step-*"))
    assert steps == ["step-4", "step-5"]  # saved at 2, 4 and the end; keep the last 2
    assert (run_dir / "latest").read_text().strip() == "step-5"
    step = run_dir / "step-5"
    rows = []
    for rank in (0, 1):
        shard = torch.load(step / f"classifier-rank{rank}.pt", weights_only=True)
        assert shard["module"]["weight"].shape == (shard["num_local"], 128)
        assert shard["optimizer_state"]["weight"]["momentum_buffer"].shape == (3, 128)
        rows.append((shard["class_start"], shard["num_local"]))
    assert rows == [(0, 3), (3, 3)]
    meta = json.loads((step / "meta.json").read_text())
    model = create_backbone(meta["backbone"], **meta["backbone_kwargs"])
    model.load_state_dict(torch.load(step / "backbone.pt", weights_only=True), strict=True)


def test_wandb_offline_log_has_metrics(trained_run: dict) -> None:
    history = read_history(find_run_log(trained_run["run_dir"]))
    train_rows = [r for r in history if "train/loss" in r]
    assert [r["_step"] for r in train_rows] == [2, 4, 5]
    keys = [
        "train/lr",
        "train/samples_per_sec",
        "train/grad_norm",
        "train/loss_ce",
        *(f"angles/target_angle_{s}_deg" for s in ("mean", "std", "p10", "p50", "p90")),
        "angles/hardest_negative_angle_mean_deg",
        "angles/negative_angle_mean_deg",
    ]
    for key in keys:
        assert all(key in r for r in train_rows), key
    for row in train_rows:
        assert row["angles/target_angle_p10_deg"] <= row["angles/target_angle_p90_deg"]
        assert row["angles/hardest_negative_angle_mean_deg"] <= 180.0
    # A histogram of target angles every train.histogram_every=2 steps (logged steps 2, 4).
    hist_steps = [r["_step"] for r in history if "angles/target_angle_hist" in r]
    assert hist_steps == [2, 4]
    hist = next(r for r in history if "angles/target_angle_hist" in r)["angles/target_angle_hist"]
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 8  # 2 ranks x batch 4
    eval_steps = [r["_step"] for r in history if "eval/val/accuracy" in r]
    assert eval_steps == [0, 4, 5]


def test_eval_and_export_commands_agree(trained_run: dict, tiny_dataset: Path) -> None:
    work, run_dir = trained_run["work"], trained_run["run_dir"]
    val = str(tiny_dataset / "val.bin")
    onnx_path = work / "exported.onnx"
    out = _facetrain("export", str(run_dir), "--out", str(onnx_path), cwd=work).stdout
    assert "max |onnxruntime - torch|" in out and onnx_path.is_file()
    _facetrain("eval", str(run_dir), "--bin", val, "--json", str(work / "t.json"), cwd=work)
    _facetrain("eval", str(onnx_path), "--bin", val, "--json", str(work / "o.json"), cwd=work)
    torch_res = json.loads((work / "t.json").read_text())["verification"]["val"]
    onnx_res = json.loads((work / "o.json").read_text())["verification"]["val"]
    assert torch_res["accuracy_mean"] == pytest.approx(onnx_res["accuracy_mean"], abs=1e-9)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert torch_res["accuracy_mean"] == pytest.approx(summary["eval_after"]["val"]["accuracy"])
    # Wrong arguments: a one-line error naming the problem, exit code 2, no traceback.
    for args, message in (
        (["--bin", val, "--nfolds", "1"], "--nfolds must be >= 2"),
        (["--bin", str(tiny_dataset / "train")], "not a verification .bin set"),
        ([], "nothing to evaluate"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "eval", str(run_dir), *args],
            capture_output=True,
            text=True,
            cwd=work,
            timeout=600,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_embed_identification_inspect_and_plots_commands(
    trained_run: dict, tiny_dataset: Path
) -> None:
    """The other tools on the trained run: embed with the exported ONNX model, rank-k
    identification, pack inspection (a damaged copy exits 1 naming the key), figures."""
    import numpy as np

    work, run_dir = trained_run["work"], trained_run["run_dir"]
    pack = tiny_dataset / "train"
    onnx_path = run_dir / "backbone.onnx"
    out = _facetrain("embed", str(onnx_path), str(pack), "--out", str(work / "e.npy"), cwd=work)
    emb = np.load(work / "e.npy")
    assert emb.shape == (24, 128) and "24 x 128" in out.stdout
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    index = (work / "e.tsv").read_text().splitlines()
    assert len(index) == 24 and index[0].split("\t")[0] == "0"

    ident = work / "ident.json"
    _facetrain(
        "eval", str(onnx_path), "--probes", str(pack), "--distractors", str(tiny_dataset /
        "val.bin"), "--ranks", "1", "5", "--json", str(ident), cwd=work,
    )  # fmt: skip
    ranks = json.loads(ident.read_text())["identification"]["rank_accuracy"]
    assert set(ranks) == {"1", "5"} and 0.0 <= ranks["1"] <= ranks["5"] <= 1.0

    report = _facetrain("inspect", str(pack), "--json", str(work / "i.json"), cwd=work).stdout
    assert "bad records : 0" in report
    assert json.loads((work / "i.json").read_text())["num_images"] == 24
    damaged = work / "damaged"
    damaged.mkdir()
    for name in ("train.idx", "property"):
        (damaged / name).write_bytes((pack / name).read_bytes())
    rec = bytearray((pack / "train.rec").read_bytes())
    key, offset = (int(v) for v in (pack / "train.idx").read_text().splitlines()[1].split())
    jpeg = offset + 8 + 24  # record frame (magic, length) + IRHeader
    assert rec[jpeg : jpeg + 2] == b"\xff\xd8"  # the image's JPEG start marker ...
    rec[jpeg : jpeg + 4] = b"\x00" * 4  # ... gone: the record cannot decode
    (damaged / "train.rec").write_bytes(bytes(rec))
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "inspect", str(damaged), "--workers", "0"],
        capture_output=True,
        text=True,
        cwd=work,
        timeout=600,
    )
    assert proc.returncode == 1 and f"key {key}:" in proc.stdout, proc.stdout + proc.stderr

    figs = work / "figs"
    out = _facetrain(
        "plots", "--out", str(figs), "--heads", "arcface", "--steps", "20", "--run",
        str(run_dir), cwd=work,
    ).stdout  # fmt: skip
    assert (figs / "toy_arcface.png").is_file() and (figs / "angles.png").is_file(), out


def test_run_folder_log_and_runs_command(trained_run: dict) -> None:
    """The run folder's config.yaml and training.log, the console of a run whose stdout is
    not a terminal (lines, no carriage returns), and `facetrain runs` on the output folder."""
    import re

    import yaml

    work, run_dir = trained_run["work"], trained_run["run_dir"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["name"] == "e2e" and config["train"]["max_steps"] == 5
    log = (run_dir / "training.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in log)
    steps = [line for line in log if "[step " in line]
    assert [re.search(r"\[step (\d+)/5\]", line).group(1) for line in steps] == ["2", "4", "5"]
    first = re.search(r"samples/s (\S+)  eta (\d+):(\d\d):(\d\d)  emb_norm (\S+)", steps[0])
    assert 0 < float(first.group(1)) < math.inf and float(first.group(5)) > 0
    assert [re.search(r"\[eval step (\d+)\] val: .* best ", line).group(1) for line in log if
            "[eval step" in line] == ["0", "4", "5"]  # fmt: skip
    assert "\r" not in trained_run["stdout"] + trained_run["stderr"]
    assert all(line in trained_run["stdout"] for line in steps)  # the console has the lines
    wandb_id = find_run_log(run_dir).stem.removeprefix("run-")
    table = _facetrain("runs", str(work), cwd=work).stdout.splitlines()
    row = next(line for line in table if line.startswith("e2e "))
    assert re.search(rf"^e2e\s+5/5\s+[\d.]+\s+val [\d.]+%\s+{wandb_id}\s+finished$", row), table
