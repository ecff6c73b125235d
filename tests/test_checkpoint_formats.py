"""Checkpoints as training loops save them: K-class classifiers, nested and prefixed state dicts, EMA copies."""
from __future__ import annotations

import warnings

import pytest
import torch

from iis_fast.errors import CheckpointError
from iis_fast.models import create_model, load_checkpoint
from iis_fast.models.checkpoint import CheckpointAdapted, classifier_prefixes

ARCH = "test_resnet"  # timm's tiny ResNet: classifier "fc"


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """A 10-class state dict whose weights differ from any fresh initialisation."""
    torch.manual_seed(3)
    m = create_model(ARCH, num_classes=10)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in sd.items())


WRAPS = {
    "plain": (lambda sd: sd, ""),
    "lightning": (lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                              "global_step": 120, "optimizer_states": [{"state": {}}],
                              "hyper_parameters": {"lr": 0.1}}, "state_dict/model."),
    "nested_plain": (lambda sd: {"state_dict": sd, "epoch": 3}, "state_dict"),       # a convention: no note
    "lightning_extra_modules": (lambda sd: {"state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                                                           "criterion.weight": torch.ones(10)}}, "state_dict/model."),
    "ddp": (lambda sd: {f"module.{k}": v for k, v in sd.items()}, "/module."),
    "ddp_in_model": (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, "model/module."),
    "compiled_ddp": (lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()}, "/module._orig_mod."),
    "ema_only": (lambda sd: {"model_ema": sd, "step": torch.tensor(5)}, "model_ema"),
}


@pytest.mark.parametrize("name", list(WRAPS))
def test_wrapped_checkpoints_load_and_say_what_was_stripped(tmp_path, trained, name) -> None:
    wrap, how = WRAPS[name]
    p = tmp_path / f"{name}.pth"
    torch.save(wrap(trained), p)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = create_model(ARCH, checkpoint=p)
    notes = [str(x.message) for x in w if issubclass(x.category, CheckpointAdapted)]
    assert model.fc.out_features == 10                      # K read from the checkpoint
    assert _same(model, trained)
    container, _, prefix = how.partition("/")
    if prefix or container not in ("", "state_dict", "model", "model_state_dict"):
        assert len(notes) == 1 and f"{name}.pth" in notes[0], notes
        if prefix:
            assert repr(prefix) in notes[0]
        if container:
            assert repr(container) in notes[0]
    else:
        assert notes == []
    # the same through load_checkpoint into an existing 1000-class timm model: resized, then loaded
    other = create_model(ARCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointAdapted)
        report = load_checkpoint(other, p)
    assert other.fc.out_features == 10 and _same(other, trained)
    assert report.missing_keys == () and report.unexpected_keys == ()


def test_two_fitting_state_dicts_are_refused_with_candidates_then_chosen(tmp_path, trained) -> None:
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in trained.items()}
    p = tmp_path / "timm_train.pth.tar"
    torch.save({"state_dict": trained, "state_dict_ema": ema, "epoch": 9}, p)
    with pytest.raises(CheckpointError, match=r"timm_train\.pth\.tar.*2 state dicts.*'state_dict'.*'state_dict_ema'"
                                              r".*checkpoint_key"):
        create_model(ARCH, checkpoint=p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointAdapted)
        assert _same(create_model(ARCH, checkpoint=p, checkpoint_key="state_dict_ema"), ema)
        assert _same(create_model(ARCH, checkpoint=p, checkpoint_key="state_dict"), trained)
    with pytest.raises(CheckpointError, match=r"no state dict 'nope'.*state_dict, state_dict_ema"):
        create_model(ARCH, checkpoint=p, checkpoint_key="nope")
    # a Lightning module holding the model and an EMA copy as two attributes
    q = tmp_path / "lightning_ema.ckpt"
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in trained.items()},
                               **{f"ema_model.{k}": v for k, v in ema.items()}}}, q)
    with pytest.raises(CheckpointError, match=r"'state_dict/ema_model\.'.*'state_dict/model\.'"):
        create_model(ARCH, checkpoint=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointAdapted)
        assert _same(create_model(ARCH, checkpoint=q, checkpoint_key="state_dict/ema_model."), ema)


def test_checkpoint_without_classifier_loads_the_rest(tmp_path, trained) -> None:
    headless = {k: v for k, v in trained.items() if not k.startswith("fc.")}
    p = tmp_path / "headless.pth"
    torch.save(headless, p)
    with pytest.warns(CheckpointAdapted, match=r"headless\.pth.*holds no classifier \(fc\)"):
        model = create_model(ARCH, checkpoint=p)
    assert _same(model, headless)
    with pytest.warns(CheckpointAdapted):
        assert create_model(ARCH, checkpoint=p, num_classes=7).fc.out_features == 7


def test_mismatch_outside_the_classifier_stays_an_error(tmp_path, trained) -> None:
    bad = dict(trained)
    k = next(k for k in bad if k.endswith("conv1.weight"))
    bad[k] = torch.zeros(1, *bad[k].shape[1:])
    p = tmp_path / "bad_conv.pth"
    torch.save({"state_dict": {f"model.{n}": v for n, v in bad.items()}}, p)
    with pytest.raises(CheckpointError, match=r"bad_conv\.pth.*mis-shaped: .*conv1\.weight"):
        create_model(ARCH, checkpoint=p)
    # another architecture whose keys contain this one's (deeper): unexpected keys, never a silent partial load
    deeper = create_model("resnet18").state_dict()
    q = tmp_path / "resnet18.pth"
    torch.save(deeper, q)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth"):
        create_model("resnet10t", checkpoint=q)


def test_classifier_prefixes_of_timm_and_torchvision_models() -> None:
    import torchvision
    assert classifier_prefixes(create_model(ARCH)) == ["fc"]
    assert classifier_prefixes(create_model("test_efficientnet")) == ["classifier"]
    assert classifier_prefixes(torchvision.models.resnet18()) == ["fc"]
    assert classifier_prefixes(torchvision.models.mobilenet_v2()) == ["classifier.1"]
