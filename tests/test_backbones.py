"""Tests for backbones/: registry, IResNet architecture, insightface state_dict layout."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from backbones import IResNet, create_backbone, list_backbones, register_backbone
from backbones import registry as registry_module

CANONICAL = ["iresnet100", "iresnet18", "iresnet200", "iresnet34", "iresnet50", "iresnet_nano"]
ALIASES = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100"}
ALIASES["r200"] = "iresnet200"
LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
    "iresnet_nano": (1, 1, 1, 1),
}
FULL_WIDTHS = (64, 128, 256, 512)
NANO_WIDTHS = (16, 24, 48, 96)
SMALL_WIDTHS = (16, 32, 64, 128)  # 4 stages of a stride-1-stem test model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def expected_state_shapes(
    layers: tuple[int, ...],
    widths: tuple[int, ...] = FULL_WIDTHS,
    embedding: int = 512,
    fmap: tuple[int, int] = (7, 7),
) -> dict[str, tuple[int, ...]]:
    """insightface iresnet.py state_dict key -> shape, written out from its naming scheme."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (widths[0], 3, 3, 3)
    bn("bn1", widths[0])
    shapes["prelu.weight"] = (widths[0],)
    inplanes = widths[0]
    for stage, (blocks, planes) in enumerate(zip(layers, widths, strict=True), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            cin = inplanes if b == 0 else planes
            bn(f"{p}.bn1", cin)
            shapes[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.prelu.weight"] = (planes,)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    bn("bn2", widths[3])
    shapes["fc.weight"] = (embedding, widths[3] * fmap[0] * fmap[1])
    shapes["fc.bias"] = (embedding,)
    bn("features", embedding)
    return shapes


def param_count(shapes: dict[str, tuple[int, ...]]) -> int:
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    total = 0
    for key, shape in shapes.items():
        if not key.endswith(buffers):
            total += int(torch.Size(shape).numel())
    return total


@functools.cache
def built(name: str) -> nn.Module:
    """Each default model is built once per session (r200 alone takes ~2 s to initialise)."""
    return create_backbone(name)


def test_registry_lists_every_iresnet_and_alias() -> None:
    # other families (mobilefacenet, vit) are covered in test_backbones_zoo.py
    assert [n for n in list_backbones() if n.startswith("iresnet")] == CANONICAL
    with_aliases = set(list_backbones(include_aliases=True))
    assert set(CANONICAL) | set(ALIASES) <= with_aliases
    for alias, name in ALIASES.items():
        model = create_backbone(alias, embedding_size=8, width_mult=0.125)
        assert isinstance(model, IResNet)
        assert model.layers_cfg == LAYERS[name]


def test_unknown_backbone_names_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        create_backbone("resnet9000")
    message = str(err.value)
    assert "resnet9000" in message
    for name in CANONICAL + list(ALIASES):
        assert name in message


def test_register_rejects_duplicates_and_registers_new_names() -> None:
    with pytest.raises(ValueError, match="iresnet18"):
        register_backbone("iresnet18")(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="r50"):
        register_backbone("brand_new", "r50")(lambda **kw: nn.Identity())
    assert "brand_new" not in list_backbones()
    try:
        register_backbone("test_tiny", "tt")(lambda **kw: nn.Linear(2, kw.get("d", 3)))
        assert isinstance(create_backbone("tt", d=5), nn.Linear)
        assert create_backbone("test_tiny").out_features == 3
        assert "test_tiny" in list_backbones()
    finally:
        registry_module._BUILDERS.pop("test_tiny", None)
        registry_module._ALIASES.pop("tt", None)
    assert "test_tiny" not in list_backbones()


@pytest.mark.parametrize("name", ["iresnet_nano", "iresnet18"])
def test_forward_backward_reaches_every_trainable_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name)
    emb = 128 if name == "iresnet_nano" else 512
    model.train()
    x = torch.randn(2, 3, 112, 112)
    out = model(x)
    assert out.shape == (2, emb)
    # A fixed random projection: a plain sum would be flattened by the BatchNorm1d head
    # (its batch-normalised output sums to a constant), starving everything before it.
    (out * torch.randn(2, emb)).sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(model.parameters())) - 1  # all but features.weight
    for pname, p in trainable.items():
        assert p.grad is not None, pname
        assert torch.count_nonzero(p.grad) > 0, pname
    assert model.features.weight.requires_grad is False
    assert model.features.weight.grad is None
    assert torch.equal(model.features.weight, torch.ones(emb))


@pytest.mark.parametrize("name", ["iresnet34", "iresnet50", "iresnet100", "iresnet200"])
def test_deeper_models_map_images_to_embeddings(name: str) -> None:
    # Train-mode BN: with insightface's N(0, 0.1) conv init and untouched running statistics,
    # an untrained deep IResNet's eval-mode activations grow past float32 range.
    model = built(name).train()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("iresnet18", None),
        ("iresnet34", None),
        ("iresnet50", 43_590_848),  # insightface r50: 43.59M parameters
        ("iresnet100", 65_156_160),  # insightface r100: 65.16M parameters
        ("iresnet200", None),
        ("iresnet_nano", None),
    ],
)
def test_state_dict_has_insightface_keys_and_shapes(name: str, published: int | None) -> None:
    model = built(name)
    if name == "iresnet_nano":
        # nano: stride-2 stem, so 112 -> 56 -> 28 -> 14 -> 7 -> 4
        expected = expected_state_shapes(LAYERS[name], NANO_WIDTHS, embedding=128, fmap=(4, 4))
    else:
        expected = expected_state_shapes(LAYERS[name])
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == expected
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == param_count(expected)
    if published is not None:
        assert n_params == published


def test_r50_specific_keys_and_strict_load() -> None:
    model = built("iresnet50")
    sd = model.state_dict()
    assert sd["layer3.13.conv2.weight"].shape == (256, 256, 3, 3)
    assert sd["layer3.0.downsample.0.weight"].shape == (256, 128, 1, 1)
    assert sd["layer1.0.bn1.weight"].shape == (64,)
    assert sd["fc.weight"].shape == (512, 512 * 7 * 7)
    assert "layer3.14.conv1.weight" not in sd and "layer1.1.downsample.0.weight" not in sd

    # A checkpoint built from the insightface table alone loads strictly and lands in place.
    gen = torch.Generator().manual_seed(1)
    ckpt = {
        k: torch.randn(s, generator=gen) if s else torch.tensor(7)
        for k, s in expected_state_shapes(LAYERS["iresnet50"]).items()
    }
    fresh = create_backbone("r50")
    result = fresh.load_state_dict(ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.layer3[13].conv2.weight, ckpt["layer3.13.conv2.weight"])
    assert torch.equal(fresh.features.running_var, ckpt["features.running_var"])


def test_iresnet18_strict_load_rejects_wrong_layout() -> None:
    expected = expected_state_shapes(LAYERS["iresnet18"])
    ckpt = {k: torch.zeros(s) if s else torch.tensor(0) for k, s in expected.items()}
    model = create_backbone("iresnet18")  # not the cached one: a failed load still copies
    ckpt_extra = dict(ckpt, **{"layer1.2.conv1.weight": torch.zeros(64, 64, 3, 3)})
    with pytest.raises(RuntimeError, match="layer1.2.conv1.weight"):
        model.load_state_dict(ckpt_extra, strict=True)
    assert len(ckpt) == 187  # 2-2-2-2 blocks: the count insightface r18 checkpoints have


@pytest.mark.parametrize(
    ("input_size", "fmap"), [(112, (7, 7)), (128, (8, 8)), ((96, 112), (6, 7)), (100, (7, 7))]
)
def test_fc_input_follows_input_size(input_size, fmap) -> None:
    model = create_backbone(
        "iresnet_nano", input_size=input_size, stem_stride=1, widths=SMALL_WIDTHS
    ).eval()
    assert model.fc.in_features == 128 * fmap[0] * fmap[1]
    assert model.feature_map_size == fmap
    hw = (input_size, input_size) if isinstance(input_size, int) else input_size
    with torch.no_grad():
        assert model(torch.randn(2, 3, *hw)).shape == (2, 128)


@pytest.mark.parametrize(("input_size", "fmap"), [(112, (4, 4)), ((96, 112), (3, 4))])
def test_stride2_stem_halves_once_more(input_size, fmap) -> None:
    model = create_backbone("iresnet_nano", input_size=input_size).eval()
    assert model.conv1.stride == (2, 2)
    assert model.feature_map_size == fmap
    assert model.fc.in_features == NANO_WIDTHS[3] * fmap[0] * fmap[1]
    hw = (input_size, input_size) if isinstance(input_size, int) else input_size
    with torch.no_grad():
        assert model(torch.randn(2, 3, *hw)).shape == (2, 128)
    with pytest.raises(ValueError, match="stem_stride"):
        create_backbone("iresnet_nano", stem_stride=3)


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = create_backbone("iresnet_nano").eval()
    with pytest.raises(ValueError, match=r"input_size.*\(1, 3, 128, 128\)"):
        model(torch.randn(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"got \(1, 1, 112, 112\)"):
        model(torch.randn(1, 1, 112, 112))


def test_widths_and_width_mult() -> None:
    model = create_backbone("iresnet_nano", width_mult=0.5, embedding_size=32)
    assert model.conv1.weight.shape == (8, 3, 3, 3)
    assert model.layer4[0].conv2.weight.shape == (48, 48, 3, 3)
    assert model.fc.weight.shape == (32, 48 * 16)
    model = create_backbone("r18", widths=(8, 8, 16, 16), embedding_size=16)
    assert model.layer2[0].downsample[0].weight.shape == (8, 8, 1, 1)
    assert model.layer3[1].conv1.weight.shape == (16, 16, 3, 3)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="layers"):
        IResNet(layers=(1, 1, 1))
    with pytest.raises(ValueError, match="dropout"):
        create_backbone("iresnet_nano", dropout=1.0)
    with pytest.raises(ValueError, match="width_mult"):
        create_backbone("iresnet_nano", width_mult=0)
    with pytest.raises(ValueError, match="layers"):
        create_backbone("r50", layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="input_size"):
        create_backbone("iresnet_nano", input_size=0)
    with pytest.raises(ValueError, match="input_size"):
        create_backbone("iresnet_nano", input_size=(112, 112, 3))


def test_insightface_init_and_batchnorm_settings() -> None:
    model = built("iresnet18")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            assert m.eps == 1e-5 and m.momentum == 0.1
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    w = model.layer3[0].conv1.weight  # 256*128*9 samples of N(0, 0.1)
    assert abs(w.std().item() - 0.1) < 0.002 and abs(w.mean().item()) < 0.002
    custom = create_backbone("iresnet_nano", bn_eps=2e-5, bn_momentum=0.01, conv_init_std=0.05)
    assert custom.layer1[0].bn3.eps == 2e-5 and custom.features.momentum == 0.01
    assert abs(custom.layer1[0].conv1.weight.std().item() - 0.05) < 0.005


@pytest.mark.parametrize("training", [True, False])
def test_zero_init_residual_makes_blocks_identities(training: bool) -> None:
    torch.manual_seed(0)
    model = IResNet((1, 2, 1, 1), widths=SMALL_WIDTHS, embedding_size=8, zero_init_residual=True)
    model.train(training)
    x = torch.randn(2, 16, 56, 56)
    plain_block = model.layer2[1]
    h = torch.randn(2, 32, 28, 28)
    with torch.no_grad():
        assert torch.equal(plain_block(h), h)
        first = model.layer1[0]
        assert torch.allclose(first(x), first.downsample(x))
    for m in model.modules():
        if hasattr(m, "bn3"):
            assert torch.count_nonzero(m.bn3.weight) == 0
    default = IResNet((1, 2, 1, 1), widths=SMALL_WIDTHS, embedding_size=8)
    with torch.no_grad():
        assert not torch.allclose(default.layer2[1](h), h)


def test_activation_checkpointing_recomputes_blocks_with_identical_gradients() -> None:
    torch.manual_seed(0)
    plain = create_backbone("iresnet_nano", input_size=64)
    ckpt = create_backbone("iresnet_nano", input_size=64, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "ckpt": 0}

    def counting(key: str, block: nn.Module) -> None:
        # Wrap forward itself: checkpoint's recomputation does not fire module hooks.
        inner = block.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            calls[key] += 1
            return inner(x)

        block.forward = forward

    counting("plain", plain.layer2[0])
    counting("ckpt", ckpt.layer2[0])
    x = torch.randn(4, 3, 64, 64)
    proj = torch.randn(4, 128)
    outs = []
    for model in (plain, ckpt):
        model.train()
        out = model(x)
        (out * proj).sum().backward()
        outs.append(out.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for (n, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if p1.requires_grad:
            assert torch.allclose(p1.grad, p2.grad, rtol=1e-4, atol=1e-5), n
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block ran again in backward
    ckpt.eval()
    with torch.no_grad():
        ckpt(x)
    assert calls["ckpt"] == 3  # no recomputation outside training


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = create_backbone("iresnet_nano", input_size=32, dropout=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize(("head_fp32", "dtype"), [(True, torch.float32), (False, torch.bfloat16)])
def test_head_runs_in_fp32_under_autocast(head_fp32: bool, dtype: torch.dtype) -> None:
    model = create_backbone("iresnet_nano", input_size=32, head_fp32=head_fp32).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.dtype == dtype
