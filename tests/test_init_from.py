"""Fine-tuning from other weights (``model.init_from``) and the model tools on a raw
state_dict (``eval`` / ``export`` / ``embed`` with ``--backbone``).

One 2-process run makes the source checkpoint; its backbone is also saved the way
arcface_torch users save theirs, ``torch.save(backbone.state_dict(), path)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _packs import write_test_pack
from test_resume import _state, _train

from backbones import create_backbone
from backbones.weights import WeightsError, read_state_dict
from launcher.cli import main
from launcher.preflight import check_run_inputs
from trainer.config import load_config
from trainer.context import DistContext
from trainer.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"

# A few training runs, each several processes: generous limits on a loaded 2-core machine.
pytestmark = [pytest.mark.timeout(2400), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def source(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("init_from")
    _train(tiny_dataset, out, "src", "train.max_steps=2", "partialfc.sample_rate=1.0")  # 2 ranks
    step = out / "src" / "step-2"
    model = create_backbone("iresnet_nano", embedding_size=128)
    model.load_state_dict(torch.load(step / "backbone.pt", weights_only=True))
    torch.save(model.state_dict(), out / "model.pt")
    return {"step": step, "weights": out / "model.pt", "out": out}


def _config(tiny_dataset: Path, out: Path, *overrides: str):
    return load_config(
        DEMO,
        [
            f"data.train={tiny_dataset / 'train'}",
            "data.val=[]",
            "data.workers=0",
            f"run.output_dir={out}",
            "train.batch_size=4",
            "train.progress=false",
            "wandb.mode=disabled",
            "dist.nproc=1",
            *overrides,
        ],
    )


def _trainer(tiny_dataset: Path, out: Path, *overrides: str) -> Trainer:
    return Trainer(_config(tiny_dataset, out, *overrides), DistContext.single())


def _assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key].cpu(), value), key


def test_init_from_a_checkpoint_or_a_state_dict(
    tiny_dataset: Path, tmp_path: Path, source: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    saved = torch.load(source["step"] / "backbone.pt", weights_only=True)
    reference = _trainer(tiny_dataset, tmp_path)  # no init_from: the seeded fresh init
    fresh = reference.partial_fc.state_dict()["weight"]
    saved_classifier = _state(source["step"], 2)["fc.weight"]  # the 2 shards in class order
    # The source trained away from that init (else the checks below could not fail).
    assert not torch.equal(reference.backbone.state_dict()["fc.weight"], saved["fc.weight"])
    assert not torch.equal(fresh, saved_classifier)
    for spec in (source["step"], source["step"].parent, source["weights"]):
        trainer = _trainer(tiny_dataset, tmp_path, f"model.init_from={spec}")
        # The weights the first step starts from are the source's, bit for bit ...
        _assert_equal(trainer.engine.module.state_dict(), saved)
        # ... and the classifier is a fresh one for (possibly new) identities.
        assert torch.equal(trainer.partial_fc.state_dict()["weight"], fresh)
        assert trainer.step == 0
    assert "fresh classifier (6 classes)" in capsys.readouterr().out

    # init_classifier: the checkpoint's class centres, re-sharded from 2 ranks onto 1; the
    # optimizer state, its learning rate and the step count are this run's own.
    spec = (f"model.init_from={source['step']}", "model.init_classifier=true")
    taken = _trainer(tiny_dataset, tmp_path, *spec)
    assert torch.equal(taken.partial_fc.state_dict()["weight"], saved_classifier)
    assert not taken.opt_fc.state and int(taken.partial_fc.num_steps) == 0
    assert taken.opt_fc.param_groups[0]["lr"] == reference.opt_fc.param_groups[0]["lr"]
    out = capsys.readouterr().out
    assert "classifier from the checkpoint (6 classes, world size 2 -> 1)" in out


def test_resume_wins_over_init_from(
    tiny_dataset: Path, source: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    """A run that resumes takes its own checkpoint; init_from is not even read (a requeued
    job may outlive its source)."""
    gone = source["out"] / "deleted.pt"
    args = (f"model.init_from={gone}", "run.name=src", "run.resume=auto")
    config = _config(tiny_dataset, source["out"], *args)
    check_run_inputs(config)
    trainer = Trainer(config, DistContext.single())
    assert "ignored: the run resumes" in capsys.readouterr().out
    trainer._maybe_resume()
    assert trainer.step == 2
    saved = torch.load(source["step"] / "backbone.pt", weights_only=True)
    _assert_equal(trainer.engine.module.state_dict(), saved)


def _dry_run(capsys: pytest.CaptureFixture, *sets: str) -> tuple[int, str]:
    """``facetrain train --dry-run`` (validation and preflight only): exit code, stderr."""
    argv = ["train", str(DEMO), "--dry-run"]
    for item in ("data.val=[]", "train.batch_size=2", *sets):
        argv += ["--set", item]
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_init_from_refusals_name_the_file_the_key_and_the_shapes(
    tiny_dataset: Path, tmp_path: Path, source: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    def refusal(*sets: str, pack: Path = tiny_dataset / "train") -> str:
        code, err = _dry_run(capsys, f"data.train={pack}", f"run.output_dir={tmp_path}", *sets)
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    other_size = tmp_path / "r_nano_64.pt"
    torch.save(create_backbone("iresnet_nano", embedding_size=64).state_dict(), other_size)
    err = refusal(f"model.init_from={other_size}")
    assert str(other_size) in err
    assert re.search(r"key fc\.weight is \(64, \d+\) in the file, \(128, \d+\) in the model", err)

    other_net = tmp_path / "mbf.pt"
    torch.save(create_backbone("mbf", embedding_size=128, scale=1).state_dict(), other_net)
    err = refusal(f"model.init_from={other_net}")
    assert re.search(r"key conv1\.weight \(\d+, 3, 3, 3\) of the model is not in the file", err)

    err = refusal(f"model.init_from={tmp_path / 'nothing.pt'}")
    assert "model.init_from" in err and "no such checkpoint folder or weights file" in err

    no_classifier = (f"model.init_from={source['weights']}", "model.init_classifier=true")
    assert "holds no classifier" in refusal(*no_classifier)

    # Other identities: 8 classes in the pack, 6 in the checkpoint's classifier ...
    pack = tmp_path / "pack8"
    write_test_pack(pack, [i % 8 for i in range(16)], size=(112, 112))
    with_classifier = (f"model.init_from={source['step']}", "model.init_classifier=true")
    assert "has 6 classes, the pack has 8" in refusal(*with_classifier, pack=pack)
    # ... and without init_classifier the same source fits: a fresh classifier for them.
    code, err = _dry_run(capsys, f"data.train={pack}", f"model.init_from={source['step']}")
    assert code == 0, err


def test_a_distributed_deepspeed_run_from_init_from(
    tiny_dataset: Path, tmp_path: Path, source: dict[str, Path]
) -> None:
    """From the CLI: 3 ranks under ZeRO-3 take the 2-rank checkpoint's backbone and class
    centres. At a learning rate of 1e-9 the first step moves nothing measurably, so the
    step-1 checkpoint holds the source's parameters (a random init would be far off)."""
    out = _train(
        tiny_dataset,
        tmp_path,
        "ft",
        "dist.engine=deepspeed",
        "deepspeed.zero_stage=3",
        "dist.nproc=3",
        "train.max_steps=1",
        "partialfc.sample_rate=1.0",
        "optimizer.lr=1e-9",
        f"model.init_from={source['step']}",
        "model.init_classifier=true",
    )
    assert "classifier from the checkpoint (6 classes, world size 2 -> 3)" in out
    after, before = tmp_path / "ft" / "step-1", source["step"]
    # Parameters only: the BatchNorm statistics follow the step's batch at any learning rate.
    ref = torch.load(before / "backbone.pt", weights_only=True)
    got = torch.load(after / "backbone.pt", weights_only=True)
    params = [k for k in ref if "running_" not in k and "num_batches" not in k]
    assert params and ref.keys() == got.keys()
    for key in params:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=key)
    classifier = _state(after, 3)["fc.weight"]  # the 3 shards' rows in class order
    torch.testing.assert_close(classifier, _state(before, 2)["fc.weight"], rtol=0, atol=1e-6)


def _tool(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


def test_eval_export_embed_of_a_state_dict_match_its_checkpoint(
    tiny_dataset: Path, tmp_path: Path, source: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    step, weights, val = str(source["step"]), str(source["weights"]), str(tiny_dataset / "val.bin")
    arch = ("--backbone", "iresnet_nano", "--embedding-size", "128")
    for name, model in (("ckpt", (step,)), ("sd", (weights, *arch))):
        _tool(
            "eval",
            *model,
            "--bin",
            val,
            "--batch-size",
            "8",
            "--nfolds",
            "5",
            "--json",
            str(tmp_path / f"{name}.json"),
        )
        _tool("export", *model, "--out", str(tmp_path / f"{name}.onnx"))
        _tool("embed", *model, val, "--out", str(tmp_path / f"{name}.npy"))
        _tool(
            "embed",
            str(tmp_path / f"{name}.onnx"),
            val,
            "--out",
            str(tmp_path / f"{name}_onnx.npy"),
        )
    capsys.readouterr()
    ckpt_eval = json.loads((tmp_path / "ckpt.json").read_text())
    assert ckpt_eval == json.loads((tmp_path / "sd.json").read_text())
    emb = np.load(tmp_path / "ckpt.npy")
    assert emb.shape == (40, 128)
    np.testing.assert_array_equal(np.load(tmp_path / "sd.npy"), emb)
    for name in ("ckpt_onnx", "sd_onnx"):  # a checkpoint's embeddings == its ONNX export's
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), emb, rtol=0, atol=1e-5)

    # A state_dict file needs its network named; a checkpoint names its own.
    assert main(["embed", weights, val, "--out", str(tmp_path / "x.npy")]) == 2
    assert "name it with --backbone NAME" in capsys.readouterr().err
    assert main(["export", step, "--backbone", "r50", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--backbone / --embedding-size are for a state_dict file" in capsys.readouterr().err
    wrong = ("--backbone", "iresnet_nano")  # embedding size 512 by default
    assert main(["eval", weights, *wrong, "--bin", val]) == 2
    assert re.search(
        r"key fc\.weight is \(128, \d+\) in the file, \(512, \d+\)", capsys.readouterr().err
    )


def test_weights_files_in_the_forms_users_have(tmp_path: Path) -> None:
    """A plain state_dict, arcface_torch's resume file (``checkpoint_gpu_0.pt``) and keys of a
    DDP-wrapped module read as the same weights; anything else is refused naming the file."""
    state = create_backbone("iresnet_nano", embedding_size=16).state_dict()
    torch.save(state, tmp_path / "plain.pt")
    resume_file = {
        "epoch": 3,
        "global_step": 1200,
        "state_dict_backbone": state,
        "state_dict_softmax_fc": {"weight": torch.zeros(4, 16)},
    }
    torch.save(resume_file, tmp_path / "checkpoint_gpu_0.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    for name in ("plain.pt", "checkpoint_gpu_0.pt", "ddp.pt"):
        _assert_equal(read_state_dict(tmp_path / name), state)
    torch.save({"lr": 0.1}, tmp_path / "not_weights.pt")
    (tmp_path / "text.pt").write_text("hello")
    for name, reason in (
        ("not_weights.pt", "not a backbone state_dict"),
        ("text.pt", "cannot read"),
    ):
        with pytest.raises(WeightsError, match=f"{tmp_path / name}: {reason}"):
            read_state_dict(tmp_path / name)
