"""Discovery on the trained zoo checkpoints: permuting a trained model keeps its predictions."""

from __future__ import annotations

import pytest
import torch

from alignment import discover, permute
from fusion.data import load_fashion_mnist
from fusion.zoo import load_model
from tests.conftest import rel_err


@pytest.mark.parametrize("name", ["r18w16-s2", "vit64-s2"])
def test_trained_model_permutation_keeps_predictions(zoo_dir, name):
    model, entry = load_model(name, zoo_dir)
    data = load_fashion_mnist("test")
    x = data.tensors[0][:64]
    graph = discover(model, x[:2])
    permuted = permute(model, graph, graph.random_permutations(seed=0))
    with torch.no_grad():
        a, b = model(x), permuted(x)
    assert rel_err(a, b) < 1e-5
    assert torch.equal(a.argmax(1), b.argmax(1))
