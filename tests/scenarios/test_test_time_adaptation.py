"""The test-time-adaptation scenario: domain sequences, one test set per domain, file layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clpeft import config
from clpeft.errors import UserError
from clpeft.scenarios import corruptions as C
from clpeft.scenarios.datasets import load_dataset
from clpeft.scenarios.test_time_adaptation import GRADUAL_SEVERITIES
from clpeft.scenarios.test_time_adaptation import TestTimeAdaptation as TTAScenario  # not a pytest class


def _scenario(**kw):
    params = {"dataset": "sklearn_digits", "corruptions": ["gaussian_noise", "fog"], "test_per_class": 5, **kw}
    return TTAScenario(seed=0, **params)


def test_continual_domains_share_the_clean_test_images_corrupted_each_way():
    scenario = _scenario(severity=4)
    stream = scenario.experiences()
    train, test = load_dataset("sklearn_digits", "~/.cache/clpeft/data")
    assert [e.index for e in stream] == [1, 2]  # experience 0 is the source phase
    assert [e.domain for e in stream] == ["gaussian_noise@4", "fog@4"]
    assert all(e.train is None and e.classes_seen_so_far == list(range(10)) for e in stream)
    assert len(scenario.source) == len(train) and scenario.input_shape == (1, 8, 8)
    (_, idx_a), (_, idx_b) = stream[0].test.parts[0], stream[1].test.parts[0]
    assert torch.equal(idx_a, idx_b) and len(idx_a) == 50  # 5 per class, the same images in every domain
    assert torch.bincount(test.targets[idx_a]).tolist() == [5] * 10
    x, y = stream[1].test.load()
    assert torch.equal(y, test.targets[idx_a])
    assert torch.equal(x, C.corrupt(test.inputs[idx_a], "fog", 4, 0, idx_a))


def test_gradual_mode_runs_each_corruption_up_and_down_in_severity():
    stream = _scenario(mode="gradual").experiences()
    assert [e.domain for e in stream] == [f"{c}@{s}" for c in ("gaussian_noise", "fog") for s in GRADUAL_SEVERITIES]
    assert GRADUAL_SEVERITIES == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert torch.equal(stream[0].test.load()[0], stream[8].test.load()[0])  # gaussian_noise@1 twice, same noise


def test_mixed_mode_chunks_are_a_shuffle_of_every_domain_sample():
    continual = _scenario().experiences()
    mixed = _scenario(mode="mixed", chunk_size=30).experiences()
    assert [len(e.test) for e in mixed] == [30, 30, 30, 10] and {e.domain for e in mixed} == {"mixed"}

    def pixels(exps):
        return sorted(map(bytes, torch.cat([e.test.load()[0] for e in exps]).flatten(1).numpy()))

    assert pixels(mixed) == pixels(continual)  # the same 100 corrupted samples, nothing lost or repeated
    labels = torch.cat([e.test.targets for e in mixed])
    assert sorted(labels.tolist()) == sorted(torch.cat([e.test.targets for e in continual]).tolist())
    order = torch.cat([e.test.parts[0][1] for e in mixed])
    assert not torch.equal(order, torch.arange(100))  # shuffled across domains
    x, y = mixed[0].test.load()  # one grouped gather per batch equals the domains' own samples
    mixture = mixed[0].test.parts[0][0]
    for pos in (0, 7, 29):
        k = int(mixed[0].test.parts[0][1][pos])
        domain, offset = divmod(k, 50)
        assert torch.equal(x[pos], continual[domain].test.load([offset])[0][0])
        assert y[pos] == mixture.targets[k]


def test_cifar_c_files_are_read_by_severity_block(tmp_path):
    n = 6  # a miniature CIFAR-10-C: 5 severity blocks of 6 images
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
    labels = np.tile(np.arange(n) % 3, 5).astype(np.uint8)
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    scenario = TTAScenario(seed=0, corruptions=["fog"], severity=3, corrupted_root=str(tmp_path), source_checkpoint="unused-here")
    (exp,) = scenario.experiences()
    x, y = exp.test.load()
    assert torch.equal(x, torch.from_numpy(images[2 * n : 3 * n]).permute(0, 3, 1, 2))
    assert y.tolist() == labels[2 * n : 3 * n].tolist() and scenario.source is None
    assert exp.domain == "fog@3" and scenario.class_names == ["0", "1", "2"]


def test_imagenet_c_folders_are_read_with_sorted_class_folders(tmp_path):
    for k, wnid in enumerate(["n02", "n01"]):
        folder = tmp_path / "snow" / "2" / wnid
        folder.mkdir(parents=True)
        Image.fromarray(np.full((224, 224, 3), 40 * (k + 1), dtype=np.uint8)).save(folder / "a.JPEG")
    scenario = TTAScenario(
        seed=0,
        corruptions=["snow"],
        severity=2,
        corrupted_root=str(tmp_path),
        corrupted_layout="imagenet_c",
        source_checkpoint="unused-here",
    )
    (exp,) = scenario.experiences()
    x, y = exp.test.load()
    assert scenario.class_names == ["n01", "n02"] and y.tolist() == [0, 1]
    assert x.shape == (2, 3, 224, 224) and abs(int(x[0].float().mean()) - 80) <= 2  # n01 holds the 80-grey image


@pytest.mark.parametrize(
    "scenario,message",
    [
        ({"corruptions": ["fgo"]}, "scenario.corruptions\\[0\\]: unknown corruption 'fgo'; did you mean 'fog'"),
        ({"corruption_constants": "cifar10"}, "scenario.corruption_constants"),  # frost, refused before, is now on the fly
        ({"dataset": None}, "scenario.dataset: name the clean dataset"),
        ({"severity": 6}, "scenario.severity"),
    ],
)
def test_config_mistakes_name_the_key(scenario, message):
    cfg = {
        "scenario": {"name": "test_time_adaptation", "dataset": "sklearn_digits", **scenario},
        "backbone": {"name": "mlp"},
        "strategy": {"name": "finetune"},
    }
    with pytest.raises(UserError, match=message):
        config.resolve(cfg)
