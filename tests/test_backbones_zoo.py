"""Tests for the whole backbone registry: MobileFaceNet, ViT, and what every backbone must do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backbones import MobileFaceNet, VisionTransformer, create_backbone, list_backbones
from backbones.profile import count_flops, format_table, main, profile_backbone
from backbones.registry import resolve_backbone_name
from backbones.vit import DropPath

ALL = {
    "iresnet18": ["r18"],
    "iresnet34": ["r34"],
    "iresnet50": ["r50"],
    "iresnet100": ["r100"],
    "iresnet200": ["r200"],
    "iresnet_nano": [],
    "mobilefacenet": ["mbf"],
    "mobilefacenet_large": ["mbf_large"],
    "vit_t": ["vit_tiny"],
    "vit_s": ["vit_small"],
    "vit_b": ["vit_base"],
    "vit_l": ["vit_large"],
}

# Narrow versions with the full depth and module structure: forward+backward of the real sizes
# would take minutes on a 2-core CPU, and "every parameter gets a gradient" depends on the
# structure, not on the width.
SLIM: dict[str, dict[str, object]] = {
    "iresnet": {"width_mult": 0.125},
    "mobilefacenet": {"scale": 1},
    "vit": {"dim": 32, "drop_path_rate": 0.0},  # a dropped branch gets no gradient
}

# Multiply-adds ("GFLOPs") and parameters published by the insightface model zoo.
PUBLISHED_GMACS = {
    "iresnet50": 6.3,
    "iresnet100": 12.1,
    "vit_t": 1.5,
    "vit_s": 5.7,
    "vit_b": 11.4,
    "vit_l": 25.3,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slim_kwargs(name: str) -> dict[str, object]:
    for prefix, kwargs in SLIM.items():
        if name.startswith(prefix):
            return dict(kwargs)
    return {}


def test_registry_lists_every_family_and_alias() -> None:
    assert list_backbones() == sorted(ALL)
    every = sorted(set(ALL) | {a for aliases in ALL.values() for a in aliases})
    assert list_backbones(include_aliases=True) == every
    for name, aliases in ALL.items():
        for alias in aliases:
            assert resolve_backbone_name(alias) == name
    assert isinstance(create_backbone("mbf", scale=1), MobileFaceNet)
    assert isinstance(create_backbone("vit_tiny", dim=16, depth=1), VisionTransformer)


@pytest.mark.parametrize("name", list_backbones())
def test_full_size_shapes_on_meta_device(name: str) -> None:
    """Every registered backbone at its real size maps [B, 3, 112, 112] to [B, embedding]."""
    with torch.device("meta"):
        model = create_backbone(name).eval()
        out = model(torch.empty(3, 3, 112, 112))
        emb = 64
        small = create_backbone(name, embedding_size=emb).eval()
        assert small(torch.empty(2, 3, 112, 112)).shape == (2, emb)
    expected = 128 if name == "iresnet_nano" else 512
    assert out.shape == (3, expected)
    assert model.embedding_size == expected


@pytest.mark.parametrize("name", list_backbones())
def test_every_parameter_receives_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, embedding_size=16, **slim_kwargs(name)).train()
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 16)
    assert torch.isfinite(out).all()
    # Random projection: a plain sum is flattened by the BatchNorm1d head.
    (out * torch.randn(2, 16)).sum().backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or torch.count_nonzero(p.grad) == 0)
    ]
    assert missing == []
    assert sum(p.requires_grad for p in model.parameters()) >= len(list(model.parameters())) - 1


# ------------------------------------------------------------------------ insightface layouts


def _bn(shapes: dict, prefix: str, c: int) -> None:
    for key in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{key}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def mbf_shapes(blocks, scale, emb=512, fmap=7) -> dict[str, tuple[int, ...]]:
    """insightface mobilefacenet.py state_dict key -> shape, from its naming scheme."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_block(p, cin, cout, k, groups=1, prelu=True):
        shapes[f"{p}.layers.0.weight"] = (cout, cin // groups, k, k)
        _bn(shapes, f"{p}.layers.1", cout)
        if prelu:
            shapes[f"{p}.layers.2.weight"] = (cout,)

    def depthwise(p, cin, cout, g):
        conv_block(f"{p}.layers.0", cin, g, 1)
        conv_block(f"{p}.layers.1", g, g, 3, groups=g)
        conv_block(f"{p}.layers.2", g, cout, 1, prelu=False)

    def residual(p, c, n, g):
        for i in range(n):
            depthwise(f"{p}.layers.{i}", c, c, g)

    c64, c128 = 64 * scale, 128 * scale
    conv_block("layers.0", 3, c64, 3)
    if blocks[0] == 1:
        conv_block("layers.1", c64, c64, 3, groups=64)
    else:
        residual("layers.1", c64, blocks[0], 128)
    depthwise("layers.2", c64, c64, 128)
    residual("layers.3", c64, blocks[1], 128)
    depthwise("layers.4", c64, c128, 256)
    residual("layers.5", c128, blocks[2], 256)
    depthwise("layers.6", c128, c128, 512)
    residual("layers.7", c128, blocks[3], 256)
    conv_block("conv_sep", c128, 512, 1)
    shapes["features.layers.0.layers.0.weight"] = (512, 1, fmap, fmap)
    _bn(shapes, "features.layers.0.layers.1", 512)
    shapes["features.layers.2.weight"] = (emb, 512)
    _bn(shapes, "features.layers.3", emb)
    return shapes


def vit_shapes(dim, depth, emb=512, tokens=144, patch=9) -> dict[str, tuple[int, ...]]:
    """insightface vit.py (norm_layer="ln") state_dict key -> shape."""
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, tokens, dim),
        "mask_token": (1, 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "feature.0.weight": (dim, dim * tokens),
        "feature.2.weight": (emb, dim),
    }
    _bn(shapes, "feature.1", dim)
    _bn(shapes, "feature.3", emb)
    for i in range(depth):
        p = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            shapes[f"{p}.{norm}.weight"] = (dim,)
            shapes[f"{p}.{norm}.bias"] = (dim,)
        shapes[f"{p}.attn.qkv.weight"] = (3 * dim, dim)
        shapes[f"{p}.attn.proj.weight"] = (dim, dim)
        shapes[f"{p}.attn.proj.bias"] = (dim,)
        shapes[f"{p}.mlp.fc1.weight"] = (4 * dim, dim)
        shapes[f"{p}.mlp.fc1.bias"] = (4 * dim,)
        shapes[f"{p}.mlp.fc2.weight"] = (dim, 4 * dim)
        shapes[f"{p}.mlp.fc2.bias"] = (dim,)
    return shapes


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mobilefacenet", mbf_shapes((1, 4, 6, 2), 2)),
        ("mobilefacenet_large", mbf_shapes((2, 8, 12, 4), 4)),
        ("vit_t", vit_shapes(256, 12)),
        ("vit_s", vit_shapes(512, 12)),
        ("vit_b", vit_shapes(512, 24)),
        ("vit_l", vit_shapes(768, 24)),
    ],
)
def test_state_dict_follows_insightface_layout(name: str, expected: dict) -> None:
    with torch.device("meta"):
        model = create_backbone(name)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == expected


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_insightface_style_checkpoint_loads_strictly(name: str) -> None:
    kwargs = {"scale": 1} if name == "mbf" else {"dim": 32, "depth": 2}
    table = mbf_shapes((1, 4, 6, 2), 1) if name == "mbf" else vit_shapes(32, 2)
    gen = torch.Generator().manual_seed(3)
    ckpt = {k: torch.randn(s, generator=gen) if s else torch.tensor(5) for k, s in table.items()}
    model = create_backbone(name, **kwargs)
    result = model.load_state_dict(ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    key = "blocks.1.attn.qkv.weight"
    if name == "mbf":
        key = "layers.5.layers.3.layers.1.layers.0.weight"
    assert torch.equal(model.state_dict()[key], ckpt[key])
    bad = dict(ckpt)
    bad.pop(key)
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        create_backbone(name, **kwargs).load_state_dict(bad, strict=True)


# ------------------------------------------------------------------------ configurable sizes


@pytest.mark.parametrize(
    ("input_size", "fmap"), [(112, (7, 7)), (128, (8, 8)), ((96, 112), (6, 7))]
)
def test_mobilefacenet_gdc_kernel_follows_input_size(input_size, fmap) -> None:
    model = create_backbone("mbf", scale=1, embedding_size=24, input_size=input_size).eval()
    assert model.feature_map_size == fmap
    assert model.features.layers[0].layers[0].kernel_size == fmap
    hw = (input_size, input_size) if isinstance(input_size, int) else input_size
    with torch.no_grad():
        assert model(torch.randn(2, 3, *hw)).shape == (2, 24)
    with pytest.raises(ValueError, match=r"input_size.*got \(1, 3, 112, 112\)"):
        create_backbone("mbf", scale=1, input_size=128)(torch.randn(1, 3, 112, 112))


@pytest.mark.parametrize(("input_size", "tokens"), [(112, 144), (128, 196), ((96, 112), 120)])
def test_vit_tokens_follow_input_size(input_size, tokens) -> None:
    model = create_backbone("vit_t", dim=16, depth=1, input_size=input_size, embedding_size=8)
    assert model.num_patches == tokens
    assert model.pos_embed.shape == (1, tokens, 16)
    assert model.feature[0].in_features == 16 * tokens
    hw = (input_size, input_size) if isinstance(input_size, int) else input_size
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, *hw)).shape == (2, 8)


def test_vit_random_masking_keeps_a_fraction_and_restores_order() -> None:
    model = create_backbone("vit_t", dim=8, depth=1, mask_ratio=0.25)
    tokens = torch.arange(2 * 144 * 8, dtype=torch.float32).reshape(2, 144, 8)
    torch.manual_seed(0)
    kept, restore = model._random_keep(tokens)
    assert kept.shape == (2, 108, 8)  # int(144 * 0.75)
    # Every kept token is an original token, no duplicates, and restore undoes the shuffle.
    for b in range(2):
        ids = (kept[b, :, 0] / 8).long() - b * 144
        assert len(set(ids.tolist())) == 108
        assert torch.equal(tokens[b, ids], kept[b])
    rest = torch.full((2, 36, 8), -1.0)
    unshuffled = torch.gather(torch.cat([kept, rest], 1), 1, restore[:, :, None].expand(-1, -1, 8))
    masked = unshuffled[:, :, 0] < 0  # [2, 144]
    assert masked.sum(1).tolist() == [36, 36]
    assert torch.equal(unshuffled[~masked], tokens[~masked])


def test_vit_eval_is_deterministic_and_training_masks() -> None:
    torch.manual_seed(0)
    model = create_backbone("vit_t", dim=16, depth=2, embedding_size=8, mask_ratio=0.5)
    x = torch.randn(4, 3, 112, 112)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))  # different random masks
        model.mask_ratio = 0.0
        model.blocks[1].drop_path.p = 0.0
        assert torch.allclose(model(x), model(x))


def test_drop_path_scales_survivors_and_is_identity_in_eval() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.25)
    x = torch.ones(4000, 3)
    y = drop(x)
    kept = y[:, 0] != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_activation_checkpointing_gives_identical_gradients(name: str) -> None:
    kwargs: dict[str, object] = (
        {"scale": 1, "input_size": 64}
        if name == "mbf"
        else {"dim": 16, "depth": 2, "input_size": 36, "mask_ratio": 0.0, "drop_path_rate": 0.0}
    )
    torch.manual_seed(0)
    plain = create_backbone(name, embedding_size=8, **kwargs).train()
    ckpt = create_backbone(name, embedding_size=8, activation_checkpointing=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.train()
    size = kwargs["input_size"]
    x = torch.randn(4, 3, size, size)
    proj = torch.randn(4, 8)
    for model in (plain, ckpt):
        (model(x) * proj).sum().backward()
    compared = 0
    for (n, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if p1.grad is None:  # the ViT's mask_token is unused without masking
            assert p2.grad is None and n == "mask_token"
            continue
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-4, atol=1e-6), n
        compared += 1
    assert compared >= 30


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_head_runs_in_fp32_under_autocast(name: str) -> None:
    kwargs = {"scale": 1} if name == "mbf" else {"dim": 16, "depth": 1}
    model = create_backbone(name, embedding_size=8, **kwargs).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 112, 112)).dtype == torch.float32
    model.head_fp32 = False
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 112, 112)).dtype == torch.bfloat16


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="blocks"):
        create_backbone("mbf", blocks=(1, 2, 3))
    with pytest.raises(ValueError, match="scale"):
        create_backbone("mbf", scale=0)
    with pytest.raises(ValueError, match="num_heads"):
        create_backbone("vit_t", dim=20, num_heads=8)
    with pytest.raises(ValueError, match="mask_ratio"):
        create_backbone("vit_t", mask_ratio=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        create_backbone("vit_t", dim=8, depth=1, input_size=8)
    with pytest.raises(ValueError, match="input_size"):
        create_backbone("vit_t", dim=8, depth=1, input_size=(112, 112, 3))


# ------------------------------------------------------------------------ params and FLOPs


def test_count_flops_matches_hand_computation() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    )
    # conv: 4 out x 3 in x 9 taps x 64 positions = 6912 MACs; linear: 256 x 5 = 1280 MACs
    assert count_flops(model.train(), 8, device="cpu") == 2 * (6912 + 1280)
    assert model.training  # mode restored


@pytest.mark.parametrize(("name", "gmacs"), sorted(PUBLISHED_GMACS.items()))
def test_flops_match_the_insightface_model_zoo(name: str, gmacs: float) -> None:
    prof = profile_backbone(name)
    assert prof.gmacs == pytest.approx(gmacs, rel=0.01)


def test_profile_counts_parameters_and_formats_a_table(capsys) -> None:
    prof = profile_backbone("r50")
    assert prof.params == 43_590_848  # insightface r50
    assert prof.trainable_params == prof.params - 512  # frozen features.weight
    assert prof.name == "iresnet50" and prof.embedding_size == 512
    nano = profile_backbone("iresnet_nano", input_size=64)
    assert nano.input_size == (64, 64) and nano.flops < prof.flops
    table = format_table([prof, nano], {"iresnet50": ["r50"]})
    assert "| `iresnet50` | `r50` | 43.59 | 6.309 | 512 | 112x112 |" in table
    assert main(["mbf", "r18"]) == 0
    out = capsys.readouterr().out
    assert "`mobilefacenet` | `mbf`" in out and "`iresnet18` | `r18` | 24.03" in out
