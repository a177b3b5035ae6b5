"""One typed config per head and per auxiliary loss: every registered model validates its
defaults and builds its head, rejects a value out of bounds naming the key, documents every
field; the run config's ``partialfc.margin`` is their union (old form refused with the new
form shown); the README's table and the engines' registry come from the registrations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from partialfc import build_margin
from partialfc.head_configs import ArcFaceConfig
from partialfc.margins import CombinedMargin
from partialfc.registry import (
    ALIASES,
    margin_config,
    margin_names,
    reference_markdown,
)
from partialfc.specs import registered_aux_losses, registered_heads
from trainer.config import ConfigError, config_from_dict, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"

# Values for the fields a head has no default for (there is no published one).
REQUIRED = {
    "combined": {"s": 32.0, "m1": 1.0, "m2": 0.3, "m3": 0.1},
    "interclass_filtering": {"interclass_filtering_threshold": 0.5},
    "none": {"aux": {"triplet": {"weight": 0.1}}},
}
HEADS = [entry.name for entry in registered_heads()]


def _out_of_bounds(config: type, name: str) -> tuple[str, object] | None:
    """A field with a bound, and a value just outside it (None: the head has no bound)."""
    for key, field in config.model_fields.items():
        for meta in field.metadata:
            for attr, bad in (("gt", 0.0), ("ge", -1.0), ("lt", 0.0), ("le", 1.0)):
                limit = getattr(meta, attr, None)
                if limit is not None:
                    return key, limit + bad if attr in ("ge", "le") else limit
    return None


def test_the_registry_holds_every_published_head_and_alias() -> None:
    assert set(HEADS) == {
        "adaface",
        "arcface",
        "circleloss",
        "combined",
        "cosface",
        "curricularface",
        "discface",
        "interclass_filtering",
        "lsoftmax",
        "magface",
        "mv_arc_softmax",
        "mv_softmax",
        "none",
        "normface",
        "npcface",
        "softmax",
        "sphereface",
        "sphereface_arccos",
        "subcenter_arcface",
    }
    assert ALIASES == {"am_softmax": "cosface", "a_softmax": "sphereface", "circle": "circleloss"}
    assert set(margin_names()) == set(HEADS) | set(ALIASES)


@pytest.mark.parametrize("name", HEADS)
def test_every_head_builds_from_its_defaults_through_the_run_config(name: str) -> None:
    entry = next(e for e in registered_heads() if e.name == name)
    fields = REQUIRED.get(name, {})
    margin = {"name": name, **fields}
    cfg = load_config(DEMO, [f"partialfc.margin={yaml.safe_dump(margin, default_flow_style=True)}"])
    config = cfg.partialfc.margin
    assert type(config) is entry.config
    for key, default in entry.config.model_fields.items():
        if key not in fields and key not in ("name", "aux"):
            assert getattr(config, key) == default.default, key
    head = build_margin(config)
    assert type(head) is entry.head
    if "s" in entry.config.model_fields and name != "none":
        assert head.s == config.s
    # The config survives a dump and a reload unchanged (what a checkpoint stores).
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.partialfc.margin == config


@pytest.mark.parametrize("name", HEADS)
def test_every_head_rejects_a_value_out_of_bounds_naming_the_key(name: str) -> None:
    entry = next(e for e in registered_heads() if e.name == name)
    bad = _out_of_bounds(entry.config, name)
    if name in ("softmax", "none"):  # no fields with bounds
        assert bad is None
        return
    assert bad is not None, f"{name}: no field with a bound"
    key, value = bad
    margin = {"name": name, **REQUIRED.get(name, {}), key: value}
    with pytest.raises(ConfigError, match=rf"invalid config: partialfc\.margin\.{key}: Input "):
        load_config(DEMO, [f"partialfc.margin={yaml.safe_dump(margin, default_flow_style=True)}"])
    with pytest.raises(ValueError, match=rf"margin '{name}': {key}: Input "):
        margin_config(name, **{**REQUIRED.get(name, {}), key: value})


def test_every_field_of_every_head_and_aux_loss_has_a_docstring() -> None:
    models = [e.config for e in registered_heads()] + [e.config for e in registered_aux_losses()]
    for model in models:
        assert (model.__doc__ or "").strip(), model.__name__
        for key, field in model.model_fields.items():
            assert (field.description or "").strip(), f"{model.__name__}.{key}"


def test_an_alias_is_the_same_model_and_keeps_its_name() -> None:
    cfg = load_config(DEMO, ["partialfc.margin={name: am_softmax, m3: 0.35}"])
    assert cfg.partialfc.margin.name == "am_softmax"
    head = build_margin(cfg.partialfc.margin)
    assert isinstance(head, CombinedMargin) and (head.m2, head.m3) == (0.0, 0.35)


@pytest.mark.parametrize(
    ("overrides", "shown"),
    [
        (
            ["partialfc.margin=cosface", "partialfc.margin_kwargs={s: 64, m3: 0.35}"],
            "{name: cosface, s: 64, m3: 0.35}",
        ),
        (["partialfc.margin=adaface"], "{name: adaface}"),
        (
            ["partialfc.margin_kwargs={s: 16.0, aux: {center: {weight: 0.003}}}"],
            "{name: arcface, s: 16.0, aux: {center: {weight: 0.003}}}",
        ),
    ],
)
def test_the_old_form_fails_with_the_new_form_built_from_its_values(
    tmp_path: Path, overrides: list[str], shown: str
) -> None:
    raw = yaml.safe_load(DEMO.read_text())
    raw["partialfc"].pop("margin")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message.count("\n") == 0
    assert f"partialfc.margin: use the form {shown} " in message
    # The form it shows is accepted as it stands.
    load_config(path, [f"partialfc.margin={shown}"])


def test_head_name_and_key_errors_name_the_key_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"partialfc\.margin: unknown margin head 'arcfce' "):
        load_config(DEMO, ["partialfc.margin={name: arcfce}"])
    with pytest.raises(ConfigError, match="did you mean 'arcface'"):
        load_config(DEMO, ["partialfc.margin={name: arcfce}"])
    with pytest.raises(ConfigError, match=r"partialfc\.margin\.m22: unknown key \(did you mean"):
        load_config(DEMO, ["partialfc.margin.m22=0.3"])
    with pytest.raises(ConfigError, match=r"partialfc\.margin: needs a name, e\.g\. \{name: arc"):
        load_config(DEMO, ["partialfc.margin={s: 30}"])
    with pytest.raises(ConfigError, match=r"partialfc\.margin\.aux\.centre: unknown key \(did"):
        load_config(DEMO, ["partialfc.margin.aux={centre: {}}"])
    with pytest.raises(ConfigError, match=r"partialfc\.margin\.aux\.center\.alpha: Input"):
        load_config(DEMO, ["partialfc.margin.aux={center: {alpha: 1.5}}"])
    with pytest.raises(ConfigError, match=r"partialfc\.margin: .*contradicts fallback='psi'"):
        load_config(DEMO, ["partialfc.margin.easy_margin=true", "partialfc.margin.fallback=psi"])
    with pytest.raises(ConfigError, match=r"partialfc\.margin: auxiliary loss 'intra' needs"):
        load_config(DEMO, ["partialfc.margin={name: none, aux: {intra: {}}}"])


def test_aux_losses_are_attached_with_their_weights_and_fields() -> None:
    cfg = load_config(
        DEMO,
        [
            "partialfc.margin={name: cosface, s: 64, m3: 0.35, "
            "aux: {center: {weight: 0.003, alpha: 0.25}, triplet: {mining: batch_hard}}}"
        ],
    )
    head = build_margin(cfg.partialfc.margin)
    assert head.aux_weights == {"center": 0.003, "triplet": 1.0}
    assert head.aux_losses["center"].alpha == 0.25
    assert head.aux_losses["triplet"].mining == "batch_hard"
    # The dump lists the attached losses only.
    assert yaml.safe_load(dump_config(cfg))["partialfc"]["margin"]["aux"] == {
        "center": {"weight": 0.003, "alpha": 0.25},
        "triplet": {"weight": 1.0, "margin": 0.2, "mining": "batch_hard"},
    }


def test_the_default_head_is_arcface_with_its_published_values() -> None:
    raw = yaml.safe_load(DEMO.read_text())
    raw["partialfc"].pop("margin")
    cfg = config_from_dict(raw)
    assert cfg.partialfc.margin == ArcFaceConfig()
    assert (cfg.partialfc.margin.s, cfg.partialfc.margin.m2) == (64.0, 0.5)


def test_readme_lists_exactly_the_registered_heads_with_their_defaults() -> None:
    readme = (REPO / "README.md").read_text()
    begin = readme.index("<!-- heads:begin")
    end = readme.index("<!-- heads:end -->")
    block = readme[readme.index("\n", begin) + 1 : end].strip()
    assert block == reference_markdown()
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    listed = {line.split("`")[1] for line in rows}
    assert listed == set(HEADS) | {e.name for e in registered_aux_losses()}
    arcface = next(line for line in rows if line.startswith("| `arcface`"))
    assert "s=64.0, m2=0.5" in arcface


def test_readme_check_script_reports_a_stale_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "docs" / "update_readme.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from update_readme import render
    finally:
        sys.path.remove(str(REPO / "docs"))
    readme = (REPO / "README.md").read_text()
    stale = render(readme, "| head |\n| `arcface` |")
    assert stale != readme and render(stale, reference_markdown()) == readme


def test_engines_register_under_their_config_names() -> None:
    import typing

    from trainer.dist_config import DistConfig
    from trainer.engine import DDPEngine, DeepSpeedEngine, engine_names, register_engine

    assert engine_names() == ["ddp", "deepspeed"]
    assert (DDPEngine.name, DeepSpeedEngine.name) == ("ddp", "deepspeed")
    allowed = typing.get_args(DistConfig.model_fields["engine"].annotation)
    assert sorted(allowed) == engine_names()
    with pytest.raises(ValueError, match="already registered"):
        register_engine("ddp")(type("Other", (), {}))


def test_cli_heads_lists_the_table_and_explains_one_head(capsys: pytest.CaptureFixture) -> None:
    from launcher.cli import main

    assert main(["heads"]) == 0
    assert capsys.readouterr().out.strip() == reference_markdown()
    assert main(["heads", "am_softmax"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cosface: CosFace") and "  m3 = 0.4\n" in out
    assert "  s = 64.0  (> 0)\n" in out
    assert main(["heads", "arcfce"]) == 2
    assert "did you mean 'arcface'" in capsys.readouterr().err
