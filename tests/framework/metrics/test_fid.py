"""FID: torchmetrics' number equals the Fréchet formula on the feature net's features, a set against itself
is 0 and noise raises it monotonically; the feature net trains deterministically and is cached by data config."""

import json

import numpy as np
import pytest
import torch
from scipy import linalg

from lowbit.errors import LowbitError
from lowbit.metrics import fid as fid_module
from lowbit.metrics.fid import FeatureNet, data_key, feature_net, frechet_distance, stack_dataset, train_feature_net
from lowbit.registry import registry


@pytest.fixture(scope="module")
def digits():
    return registry.build("data", {"name": "digits", "image_size": 8}, seed=7)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FeatureNet(1, 10).eval().requires_grad_(False)  # FID math does not need a trained extractor


def test_fid_is_the_frechet_distance_of_the_features(digits, net):
    real, _ = stack_dataset(digits.val_set)
    fake = real.flip(-1)  # mirrored digits: a different distribution
    with torch.no_grad():
        f_r, f_g = net(real).double().numpy(), net(fake).double().numpy()
    mu_r, mu_g = f_r.mean(0), f_g.mean(0)
    cov_r, cov_g = np.cov(f_r, rowvar=False), np.cov(f_g, rowvar=False)
    want = ((mu_r - mu_g) ** 2).sum() + np.trace(
        cov_r + cov_g - 2 * linalg.sqrtm(cov_r @ cov_g).real
    )  # Heusel et al., eq. 6
    got = frechet_distance(real, fake, net)
    assert got == pytest.approx(want, rel=1e-4) and got > 0


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(digits, net):
    real, _ = stack_dataset(digits.val_set)
    itself = abs(frechet_distance(real, real, net))
    assert itself < 1e-8
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(real.shape, generator=gen)
    scores = [frechet_distance(real, real + sigma * noise, net) for sigma in (0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(scores, scores[1:])) and scores[0] > 100 * max(itself, 1e-10)
    batches = [real[:100], real[100:]]  # iterables of batches give the same number
    assert frechet_distance(batches, real + noise, net) == pytest.approx(scores[-1], rel=1e-6)
    with pytest.raises(LowbitError, match="FID needs at least 2 real and 2 generated images"):
        frechet_distance(real, real[:1], net)


def test_feature_net_training_is_deterministic():
    images, labels = stack_dataset(registry.build("data", {"name": "digits", "image_size": 8}, seed=7).train_set)
    a = train_feature_net(images[:128], labels[:128], 10, epochs=1)
    torch.manual_seed(123)  # the caller's RNG state does not matter
    b = train_feature_net(images[:128], labels[:128], 10, epochs=1)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a(images[:5]).shape == (5, 64) and (a(images[:5]) >= 0).all()  # pooled ReLU features
    assert not next(a.parameters()).requires_grad


def test_feature_net_is_float32_under_any_autocast():
    """A sampler runs inside a precision plugin's autocast; the feature network must not train or
    embed in BF16 there (it reached chance accuracy that way, and FID in the millions)."""
    images, labels = stack_dataset(registry.build("data", {"name": "digits", "image_size": 8}, seed=7).train_set)
    plain = train_feature_net(images[:128], labels[:128], 10, epochs=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = train_feature_net(images[:128], labels[:128], 10, epochs=2)
        features, logits = under(images[:8]), under.logits(images[:8])
    assert all(torch.equal(plain.state_dict()[k], under.state_dict()[k]) for k in plain.state_dict())
    assert features.dtype == logits.dtype == torch.float32
    assert torch.equal(features, plain(images[:8]))


def test_a_feature_net_that_did_not_learn_is_a_warning(tmp_path, monkeypatch):
    data = registry.build("data", {"name": "digits", "image_size": 8}, seed=7)
    monkeypatch.setattr(fid_module, "train_feature_net", lambda images, labels, n: FeatureNet(1, n).eval())
    with pytest.warns(
        UserWarning, match=r"FID feature network reached \d+\.\d% validation accuracy \(chance: 10\.0%\)"
    ):
        feature_net(data, cache_dir=tmp_path)


def test_feature_net_is_cached_by_data_config(tmp_path, monkeypatch):
    trained = []

    def quick(images, labels, num_classes, epochs=1, seed=0):
        trained.append(images.shape)
        return train_feature_net(images[:64], labels[:64], num_classes, epochs=1, seed=seed)

    monkeypatch.setattr(fid_module, "train_feature_net", quick)
    build = lambda **kw: registry.build("data", {"name": "digits", "image_size": 8, **kw}, seed=7)
    first = feature_net(build(), cache_dir=tmp_path)
    again = feature_net(build(batch_size=7), cache_dir=tmp_path)  # batch size is not part of the data
    assert len(trained) == 1 and trained[0] == (1437, 1, 8, 8)  # the training split: 1797 − ceil(0.2 · 1797)
    assert all(torch.equal(first.state_dict()[k], again.state_dict()[k]) for k in first.state_dict())
    feature_net(build(image_size=16), cache_dir=tmp_path)
    assert len(trained) == 2  # another image size is another data set
    metas = [json.loads(p.read_text()) for p in (tmp_path / "fid").glob("*.json")]
    assert sorted(m["image_size"] for m in metas) == [8, 16] and all(0 <= m["val_accuracy"] <= 1 for m in metas)
    assert data_key(build())["data"] == "lowbit.data.images.Digits"
