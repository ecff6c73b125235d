"""The IIS paper's applications (docs/applications.md): interpretability-maximising fine-tuning, kept heads and
concept explanations, on real Fashion-MNIST images, against literal computations."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import iis_fast
from iis_fast.applications import KeptHeads, concept_contributions, concept_gallery, explain, finetune
from iis_fast.applications.finetune import objective_terms, split_backbone
from iis_fast.backends.common import init_linear
from iis_fast.backends.reference import ConceptHead
from iis_fast.data.fashion_mnist import fashion_mnist_loaders
from iis_fast.errors import IISInputError
from iis_fast.models import create_model
from iis_fast.models.smallcnn import FASHION_MNIST_MEAN, FASHION_MNIST_STD

ROOT = Path(__file__).resolve().parents[1]


def _smallcnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("iis_smallcnn", num_classes=10)


def _loaders(n_train: int = 200, n_eval: int = 100, size: int = 28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD):
    return fashion_mnist_loaders(n_train, n_eval, size, mean, std, batch_size=100, seed=0)


def _batch(n: int = 64):
    train, _ = _loaders(n_train=200)
    x, y = next(iter(train))
    return x[:n], y[:n]


# ------------------------------------------------------------------------------------------------ the objective
def _backbone_grads(model, x, y, lam, probe_state, head_state, concepts):
    _, tail, params = split_backbone(model, None)
    probe = nn.Linear(96, 10)
    probe.load_state_dict(probe_state)
    head = ConceptHead(concepts, 10, 2, 0, 1)
    head.load_state_dict(head_state)
    model.zero_grad(set_to_none=True)
    loss_p, loss_c = objective_terms(tail, probe, head, x, y, lam)
    (loss_p + loss_c).backward()
    return [p.grad.clone() for p in params if p.grad is not None], [p.grad.clone() for p in head.parameters()]


def test_the_concept_loss_reaches_the_backbone_scaled_by_lam():
    """lam = 0: exactly the gradient of plain fine-tuning CE(probe(f(x)), y); lam > 0 changes it, linearly in lam;
    the head's own gradient does not depend on lam."""
    model = _smallcnn()
    model.train()
    x, y = _batch()
    probe = nn.Linear(96, 10)
    w, b = init_linear(96, 10, 0, 0)
    probe.weight.data.copy_(w)
    probe.bias.data.copy_(b)
    with torch.no_grad():
        concepts = F.normalize(model.forward_head(model.forward_features(x[:20]), pre_logits=True), dim=1)
    head = ConceptHead(concepts, 10, 2, 0, 1)
    ps, hs = probe.state_dict(), head.state_dict()
    g0, h0 = _backbone_grads(model, x, y, 0.0, ps, hs, concepts)
    g1, h1 = _backbone_grads(model, x, y, 1.0, ps, hs, concepts)
    g2, h2 = _backbone_grads(model, x, y, 2.0, ps, hs, concepts)
    # plain fine-tuning, written out
    model.zero_grad(set_to_none=True)
    F.cross_entropy(probe(model.forward_head(model.forward_features(x), pre_logits=True)), y).backward()
    plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(plain) == len(g0) > 0
    assert all(torch.equal(a, b) for a, b in zip(g0, plain))
    assert max(float((a - b).abs().max()) for a, b in zip(g1, g0)) > 1e-4
    d1 = torch.cat([(a1 - a0).flatten() for a0, a1 in zip(g0, g1)])
    d2 = torch.cat([(a2 - a0).flatten() for a0, a2 in zip(g0, g2)])
    assert float((d2 - 2 * d1).norm() / (2 * d1).norm()) < 1e-3     # linear in lam, up to float rounding
    assert all(torch.equal(a, b) for a, b in zip(h0, h1)) and all(torch.equal(a, b) for a, b in zip(h0, h2))


def test_the_frozen_prefix_and_trainable_tail_compose_to_the_representation():
    model = create_model("mobilenetv2_100", pretrained=True).eval()
    x, _ = _batch(4)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    prefix, tail, params = split_backbone(model, 2)
    with torch.no_grad():
        whole = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(tail.eval()(prefix(x)), whole)
    trainable = {id(p) for p in params}
    assert trainable == {id(p) for m in (model.blocks[-2:], model.conv_head, model.bn2) for p in m.parameters()}


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused_before_any_training(tmp_path):
    train, ev = _loaders(n_train=100, n_eval=50)
    kw = dict(epochs=1, num_concepts=20, images_per_class=2, elements="patches", progress=False, score_iis=False,
              cache_dir=tmp_path / "cache", checkpoint_dir=tmp_path / "ck")
    with pytest.raises(IISInputError, match=r"lam=-0.5: must be >= 0"):
        finetune(_smallcnn(), train, ev, lam=-0.5, **kw)
    for s in (1.0, -0.1):
        with pytest.raises(IISInputError, match=r"outside \[0, 1\)"):
            finetune(_smallcnn(), train, ev, lam=1.0, sparsity=s, **kw)
    faceless = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(IISInputError, match="cannot find the representation of Sequential"):
        finetune(faceless, train, ev, lam=1.0, **kw)
    ds = train.dataset
    keep = np.flatnonzero(ds.targets != 3)
    from iis_fast.data.fashion_mnist import FashionMNIST
    no3 = torch.utils.data.DataLoader(FashionMNIST("train", 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                                                   indices=ds.indices[keep]), batch_size=100)
    with pytest.raises(IISInputError, match=r"train_loader has no samples of class\(es\) \[3\]"):
        finetune(_smallcnn(), no3, ev, lam=1.0, **kw)
    assert not list((tmp_path / "ck").glob("epoch_*.pt"))


def test_the_cli_refuses_bad_input_in_one_line_before_reading_anything(capsys):
    from iis_fast.cli import main
    for extra, msg in ((["--lam", "-1"], "lam=-1.0: must be >= 0"), (["--lam", "1", "--sparsity", "1"], "outside [0, 1)"),
                       (["--lam", "1", "--concept-update", "sometimes"], "concept_update='sometimes'")):
        with pytest.raises(SystemExit) as e:
            main(["finetune", "no_such_model", "--data", "fashion-mnist:n_train=100,n_eval=50", *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("iis-fast: error: ") and msg in err and "\n" not in err


# ------------------------------------------------------------------------------------------------ resume
_CHILD = textwrap.dedent("""
    import sys, torch
    from iis_fast.applications import finetune
    from iis_fast.data.fashion_mnist import fashion_mnist_loaders
    from iis_fast.models import create_model
    from iis_fast.models.smallcnn import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    torch.manual_seed(0)
    model = create_model("iis_smallcnn", num_classes=10)
    train, ev = fashion_mnist_loaders(200, 50, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD, batch_size=100, seed=0)
    finetune(model, train, ev, lam=1.0, epochs=EPOCHS, num_concepts=20, images_per_class=2, elements="patches",
             batch_size=32, lr=1e-3, progress=False, score_iis=False, cache_dir=sys.argv[2], checkpoint_dir=sys.argv[1])
""")
EPOCHS = 4


def _child(ck, cache):
    """The fine-tuning run in a fresh process: the killed, the resumed and the uninterrupted run all start from the
    same process state (thread count, allocator, kernels chosen), so their numbers can be compared bit for bit."""
    return subprocess.Popen([sys.executable, "-c", _CHILD.replace("EPOCHS", str(EPOCHS)), str(ck), str(cache)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(child):
    _, err = child.communicate(timeout=600)
    assert child.returncode == 0, err.decode()[-2000:]


def test_a_killed_run_resumes_to_the_state_of_an_uninterrupted_one(tmp_path):
    ck, cache = tmp_path / "killed", tmp_path / "cache"
    child = _child(ck, cache)
    try:
        deadline = time.time() + 300
        while not (ck / "epoch_001.pt").exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    done = len(list(ck.glob("epoch_*.pt")))
    assert 1 <= done < EPOCHS, f"the child finished {done} epochs before the kill"
    _finish(_child(ck, cache))                                   # resumes from epoch_{done}
    _finish(_child(tmp_path / "whole", cache))
    last = f"epoch_{EPOCHS:03d}.pt"
    resumed = torch.load(ck / last, map_location="cpu", weights_only=False)
    whole = torch.load(tmp_path / "whole" / last, map_location="cpu", weights_only=False)
    assert resumed["history"]["resumed_from_epoch"] == done and whole["history"]["resumed_from_epoch"] == 0
    for part in ("model", "probe", "head"):
        for name, t in whole[part].items():
            assert torch.equal(t, resumed[part][name]), (part, name)
    assert [r["loss_total"] for r in whole["history"]["epochs"]] == \
        [r["loss_total"] for r in resumed["history"]["epochs"]]
    assert [r["concepts_rebuilt"] for r in whole["history"]["epochs"]] == [0] + [1] * (EPOCHS - 1)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    train, ev = _loaders(n_train=100, n_eval=50)
    kw = dict(epochs=1, num_concepts=20, images_per_class=2, elements="patches", progress=False, score_iis=False,
              cache_dir=tmp_path / "cache", checkpoint_dir=tmp_path / "ck")
    r = finetune(_smallcnn(), train, ev, lam=1.0, **kw)
    with pytest.raises(IISInputError, match="holds a run with other settings"):
        finetune(_smallcnn(), train, ev, lam=0.5, **kw)
    # the run's own head explains its predictions: the terms add up to the logit of the jointly trained head
    from iis_fast.applications import heads_from_finetune
    heads = heads_from_finetune(r)
    x, _ = next(iter(ev))
    ex = explain(r.model, x[0], heads, top=3)
    with torch.no_grad():
        logits = r.head.eval()(r.model.eval().forward_head(r.model.forward_features(x[:1]), pre_logits=True))[0]
    assert ex.prediction == int(logits.argmax()) and ex.logit == pytest.approx(float(logits.max()), abs=1e-4)
    assert heads.concept_images.shape[0] == 20 and ex.acc_s == r.history.epochs[-1]["eval_acc_concept"]


# ------------------------------------------------------------------------------------------------ kept heads
@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    model = _smallcnn(1)
    train, ev = _loaders(n_train=200, n_eval=100)
    r = iis_fast.score(model, train, eval_loader=ev, keep_heads=True, backend="reference", num_concepts=30,
                       images_per_class=2, elements="both", sparsities=(0.0, 0.5, 0.9), lrs=(1e-2, 1e-1), epochs=4,
                       progress=False, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return model, train, ev, r


def test_kept_heads_are_the_reported_heads_and_survive_save_and_load(scored, tmp_path):
    model, train, ev, r = scored
    heads = r.heads
    assert [h.acc for h in heads.heads] == r.acc          # backend="reference": the very heads of the grid
    assert heads.acc_std == r.acc_std
    assert "heads" not in r.to_dict() and iis_fast.IISResult.from_json(r.to_json()).iis == r.iis
    r.save_heads(tmp_path / "h.safetensors")
    back = iis_fast.IISResult.load_heads(tmp_path / "h.safetensors")
    x = torch.randn(50, heads.concepts.shape[1])
    for s in heads.sparsities + [None]:
        assert torch.equal(heads.predict(x, s), back.predict(x, s))
    assert torch.equal(heads.concept_images, back.concept_images)
    with pytest.raises(IISInputError, match="no kept head at sparsity 0.3"):
        back.head_at(0.3)


def test_kept_heads_follow_a_held_out_selection(tmp_path):
    """selection="holdout": lr and epoch are chosen on the held-out part of TRAIN, and the kept heads are those
    (not the heads that happen to score best on the reported split)."""
    train, ev = _loaders(n_train=200, n_eval=100)
    r = iis_fast.score(_smallcnn(1), train, eval_loader=ev, keep_heads=True, backend="reference", num_concepts=30,
                       images_per_class=2, elements="patches", sparsities=(0.0, 0.5, 0.8, 0.9, 0.95),
                       lrs=(1e-3, 1e-2, 1e-1), epochs=4, selection="holdout", progress=False,
                       cache_dir=str(tmp_path / "cache"))
    # this grid's held-out choice is not the eval split's best somewhere, so the check below can tell them apart
    assert any(a < max(row) for a, row in zip(r.acc, r.acc_per_lr))
    assert [h.acc for h in r.heads.heads] == r.acc and r.heads.acc_std == r.acc_std


def test_kept_concept_images_are_the_elements_the_concepts_were_embedded_from(scored):
    """Each kept element image, embedded again, gives its row of C (up to the thumbnail's uint8 rounding)."""
    from iis_fast.features import representation_fn
    model, _, _, r = scored
    imgs = r.heads.concept_images.float() / 255
    mean = torch.tensor(FASHION_MNIST_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(FASHION_MNIST_STD).view(1, 3, 1, 1)
    feats = F.normalize(representation_fn(model)((imgs - mean) / std), dim=1)
    cos = (feats * r.heads.concepts).sum(1)
    assert float(cos.min()) > 0.99
    # its own concept is the nearest one (up to rounding: blank background patches are near-duplicates)
    assert float(((feats @ r.heads.concepts.T).max(1).values - cos).max()) < 5e-3
    assert float(cos.mean()) > float((feats * r.heads.concepts.roll(1, 0)).sum(1).mean()) + 0.01


def test_explain_shows_the_largest_weight_times_activation_terms(scored, tmp_path):
    model, _, ev, r = scored
    x, y = next(iter(ev))
    ex = explain(model, x[7], r.heads, sparsity=0.5, top=5, label=int(y[7]), png=tmp_path / "ex.png")
    # literally: features -> a = x C^T -> LayerNorm -> zero all but |z| above the (k+1)-th smallest -> W[pred] * z
    with torch.no_grad():
        feat = model.eval().forward_head(model.forward_features(x[7:8]), pre_logits=True)[0]
        kept = r.heads.head_at(0.5)
        z = F.layer_norm(feat @ r.heads.concepts.T, (len(r.heads.concepts),), kept.norm_weight, kept.norm_bias)
        thr = sorted(z.abs().tolist())[kept.k]
        zk = torch.where(z.abs() > thr, z, torch.zeros_like(z))
        logits = kept.fc_weight @ zk + kept.fc_bias
    pred = int(logits.argmax())
    terms = [(float(kept.fc_weight[pred, j] * zk[j]), j) for j in range(len(zk))]
    want = [j for _, j in sorted(terms, reverse=True)[:5]]
    assert ex.prediction == pred and [t["index"] for t in ex.top] == want
    for t in ex.top:
        assert t["contribution"] == pytest.approx(float(kept.fc_weight[pred, t["index"]] * zk[t["index"]]), abs=1e-5)
    assert ex.logit == pytest.approx(float(logits[pred]), abs=1e-4)
    assert ex.logit == pytest.approx(ex.bias + sum(v for v, _ in terms), abs=1e-4)
    assert ex.acc_s == r.acc[1] and ex.acc_std == r.acc_std and f"acc_s = {r.acc[1]:.4f}" in ex.report()
    from PIL import Image
    assert Image.open(tmp_path / "ex.png").size[0] > 500
    concept_gallery(r.heads, tmp_path / "gallery.png")
    assert Image.open(tmp_path / "gallery.png").size[1] > 300


def test_the_readme_shows_the_experiment_as_measured():
    """The README's finetune section is bench_finetune's rendering of bench/results/finetune.json: spot checks."""
    import json
    sys.path.insert(0, str(ROOT / "bench"))
    import render_docs
    res = json.loads((ROOT / "bench" / "results" / "finetune.json").read_text())
    text = render_docs.render_finetune()
    assert text in (ROOT / "README.md").read_text()
    for row in res["summary"]:
        assert f"| {row['arm']} | {row['n']} | {row['acc_std_before'][0]:.4f} ± {row['acc_std_before'][1]:.4f} | " \
               f"{row['acc_std_after'][0]:.4f} ± {row['acc_std_after'][1]:.4f} |" in text
    assert {r["seed"] for r in res["runs"]} >= {0, 1, 2} and {r["lam"] for r in res["runs"]} >= {0.0, 1.0}
    assert (ROOT / "bench" / "results" / "finetune.png").stat().st_size > 10_000
