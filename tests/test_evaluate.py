"""Tests of fusion.experiments.evaluate on models with hand-set logits (exact expected values)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fusion.experiments.evaluate import (
    EvaluationError,
    accuracy,
    ensemble_accuracy,
    evaluate_loss_and_accuracy,
    extract_logits,
    joint_accuracy,
    predict_logits,
    split_task_accuracy,
)


class TableModel(nn.Module):
    """Returns row ``i`` of a fixed logits table for input ``i`` (inputs are N x 1 indices)."""

    def __init__(self, table: list[list[float]], hf_output: bool = False) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))
        self.dropout = nn.Dropout(0.9)
        self.hf_output = hf_output

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - tensor or ModelOutput
        logits = self.dropout(self.table[x[:, 0].long()])
        if self.hf_output:
            from transformers.modeling_outputs import ImageClassifierOutput

            return ImageClassifierOutput(logits=logits)
        return logits


def _data(labels: list[int]) -> TensorDataset:
    n = len(labels)
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.tensor(labels))


def _onehot(preds: list[int], width: int, scale: float = 5.0) -> list[list[float]]:
    return [[scale if j == p else 0.0 for j in range(width)] for p in preds]


# --------------------------------------------------------------------------- predict_logits


def test_predict_logits_matches_forward_and_restores_modes() -> None:
    table = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)).tolist()
    model = TableModel(table)
    model.train()
    model.dropout.eval()  # mixed flags must come back exactly
    data = _data([0] * 10)
    logits, labels = predict_logits(model, data, batch_size=3)
    assert logits.shape == (10, 3) and logits.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (10,)
    assert torch.allclose(logits, torch.tensor(table))  # dropout disabled during evaluation
    assert model.training and not model.dropout.training
    assert model.table.grad is None


@pytest.mark.parametrize("kind", ["dataset", "loader", "tuple"])
def test_predict_logits_accepts_loaders_and_tuples(kind: str) -> None:
    table = _onehot([1, 0, 2, 2], 3)
    ds = _data([1, 0, 2, 0])
    data = {"dataset": ds, "loader": DataLoader(ds, batch_size=3), "tuple": ds.tensors}[kind]
    logits, labels = predict_logits(TableModel(table), data)
    assert torch.equal(logits, torch.tensor(table))
    assert labels.tolist() == [1, 0, 2, 0]


def test_hf_model_output_and_extract_logits() -> None:
    model = TableModel(_onehot([0, 1], 2), hf_output=True)
    logits, _ = predict_logits(model, _data([0, 1]))
    assert torch.equal(logits, torch.tensor(_onehot([0, 1], 2)))
    t = torch.ones(2, 2)
    assert extract_logits((t, None)) is t and extract_logits({"logits": t}) is t
    with pytest.raises(TypeError, match="logits"):
        extract_logits("nothing")


def test_predict_logits_other_device_uses_a_copy() -> None:
    model = TableModel(_onehot([0], 2))
    logits, _ = predict_logits(model, _data([0]), device="cpu")
    assert logits.shape == (1, 2) and model.table.device.type == "cpu"


def test_empty_data_raises() -> None:
    with pytest.raises(EvaluationError, match="empty"):
        predict_logits(TableModel(_onehot([0], 2)), TensorDataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)))


# --------------------------------------------------------------------------- accuracy, loss, ensembles


def test_accuracy_and_loss_exact() -> None:
    labels = [0, 1, 2, 0, 1]
    preds = [0, 1, 0, 0, 2]  # 3 of 5 right
    table = _onehot(preds, 3)
    model = TableModel(table)
    assert accuracy(model, _data(labels)) == pytest.approx(0.6)
    result = evaluate_loss_and_accuracy(model, _data(labels), label_smoothing=0.1)
    expected = F.cross_entropy(torch.tensor(table), torch.tensor(labels), label_smoothing=0.1).item()
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["loss"] == pytest.approx(expected)
    assert result["n"] == 5


def test_accuracy_rejects_labels_outside_head() -> None:
    with pytest.raises(EvaluationError, match="2 outputs.*0..4.*remap=True"):
        accuracy(TableModel(_onehot([0, 1], 2)), _data([0, 4]))


def test_ensemble_averages_probabilities() -> None:
    labels = [0, 1, 0]
    # Model a: confident right on 0, barely wrong on 1 and 2; model b: the reverse.
    a = TableModel([[4.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    b = TableModel([[0.0, 0.1], [0.0, 4.0], [4.0, 0.0]])
    assert accuracy(a, _data(labels)) == pytest.approx(1 / 3)
    assert accuracy(b, _data(labels)) == pytest.approx(2 / 3)
    assert ensemble_accuracy([a, b], _data(labels)) == pytest.approx(1.0)
    with pytest.raises(EvaluationError, match="share their head"):
        ensemble_accuracy([a, TableModel(_onehot([0, 0, 0], 3))], _data(labels))
    with pytest.raises(EvaluationError, match="at least one"):
        ensemble_accuracy([], _data(labels))


# --------------------------------------------------------------------------- split tasks


def test_split_task_accuracy_exact() -> None:
    # Original labels; model A knows [0, 1, 2] (head order), model B knows [4, 3].
    labels = [0, 1, 2, 3, 4, 4]
    a_preds = [0, 1, 1, 0, 0, 0]  # on its examples (labels 0,1,2): right, right, wrong
    b_preds = [0, 0, 0, 1, 0, 1]  # head 0 = label 4, head 1 = label 3: on 3,4,4 -> right, right, wrong
    model_a = TableModel(_onehot(a_preds, 3, scale=2.0))
    model_b = TableModel(_onehot(b_preds, 2, scale=3.0))
    result = split_task_accuracy([model_a, model_b], [[0, 1, 2], [4, 3]], _data(labels))
    assert result["per_task"] == pytest.approx([2 / 3, 2 / 3])
    assert result["task_mean"] == pytest.approx(2 / 3)
    # Joint: B's logits (3.0) beat A's (2.0) everywhere, so predictions are B's labels:
    # [4, 4, 4, 3, 4, 3] vs [0, 1, 2, 3, 4, 4] -> 2 of 6.
    assert result["joint"] == pytest.approx(2 / 6)


def test_joint_accuracy_maps_columns_to_labels() -> None:
    order = [5, 6, 0, 1]
    labels = [5, 6, 0, 1, 1, 9]  # label 9 is not in the head and is ignored
    columns = [0, 1, 2, 3, 2, 0]
    model = TableModel(_onehot(columns, 4))
    assert joint_accuracy(model, order, _data(labels)) == pytest.approx(4 / 5)
    with pytest.raises(EvaluationError, match="4 outputs but classes_order lists 3"):
        joint_accuracy(model, [0, 1, 2], _data(labels))


def test_split_task_errors() -> None:
    a = TableModel(_onehot([0, 0], 2))
    with pytest.raises(EvaluationError, match="overlap"):
        split_task_accuracy([a, a], [[0, 1], [1, 2]], _data([0, 1]))
    with pytest.raises(EvaluationError, match="2 models but 1 class lists"):
        split_task_accuracy([a, a], [[0, 1]], _data([0, 1]))
    with pytest.raises(EvaluationError, match="Model 1 has 2 outputs"):
        split_task_accuracy([a, a], [[0, 1], [2, 3, 4]], _data([0, 1]))
    with pytest.raises(EvaluationError, match=r"no examples of task 1's classes \[2, 3\]"):
        split_task_accuracy([a, a], [[0, 1], [2, 3]], _data([0, 1]))


# --------------------------------------------------------------------------- real zoo (slow)


def _shared_zoo() -> Path | None:
    env = os.environ.get("FUSION_ZOO")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "zoo"
    return path if (path / "manifest.json").is_file() else None


@pytest.mark.slow
def test_real_split_models() -> None:
    zoo = _shared_zoo()
    if zoo is None:
        pytest.skip("model zoo not available (set FUSION_ZOO)")
    from fusion.experiments.data import load_fashion_mnist
    from fusion.experiments.zoo import load_model

    model_a, entry_a = load_model("r18w32-A-s4", zoo)
    model_b, entry_b = load_model("r18w32-B-s5", zoo)
    test = load_fashion_mnist("test")  # original labels
    result = split_task_accuracy([model_a, model_b], [entry_a.classes, entry_b.classes], test)
    assert result["per_task"][0] == pytest.approx(entry_a.test_accuracy, abs=1e-3)
    assert result["per_task"][1] == pytest.approx(entry_b.test_accuracy, abs=1e-3)
    assert 0.3 < result["joint"] <= max(result["per_task"])


def test_heads_accuracy_scores_heads_that_share_labels() -> None:
    """Guards: two models of one task fused with separate heads (20 outputs over labels 0-9 twice)
    were written by `fusion fuse --heads separate` and then refused by its own evaluation ("class
    lists overlap"). Each head is scored on its classes; the joint prediction is the label of the
    largest of all outputs. Hand-computed on 4 examples."""
    from fusion.experiments.evaluate import heads_accuracy

    # labels 0, 0, 1, 1. Head 0 predicts 0, 0, 1, 1 (4 right); head 1 predicts 1, 0, 0, 1 (2 right);
    # the largest outputs are head 1's, head 1's, head 1's, head 0's: joint 1, 0, 0, 1 (2 right)
    table = [[5.0, 0.0, 0.0, 9.0], [5.0, 0.0, 9.0, 0.0], [0.0, 5.0, 9.0, 0.0], [0.0, 5.0, 0.0, 1.0]]
    r = heads_accuracy(TableModel(table), [[0, 1], [0, 1]], _data([0, 0, 1, 1]))
    assert r["per_task"] == [1.0, 0.5] and r["joint"] == 0.5
    with pytest.raises(EvaluationError, match="names a label twice"):
        heads_accuracy(TableModel(table), [[0, 0], [0, 1]], _data([0, 0, 1, 1]))


def test_a_list_of_labelled_batches_evaluates_like_the_dataset():
    """Guards: evaluation data given as a list of (inputs, labels) batches, the form calibration takes,
    scores like the same examples as a dataset (before: the batches were collated again into a 5-D
    input and the model failed)."""
    from torch.utils.data import TensorDataset

    from fusion.experiments.evaluate import evaluate_loss_and_accuracy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10) % 3
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    want = evaluate_loss_and_accuracy(model, TensorDataset(x, y))
    got = evaluate_loss_and_accuracy(model, batches)
    assert got["n"] == want["n"] == 10 and got["accuracy"] == want["accuracy"]
    assert abs(got["loss"] - want["loss"]) < 1e-6


def test_uint8_images_are_a_specific_error_saying_how_to_convert_them() -> None:
    """Guards: a DataLoader of uint8 images (used as the user gives it) evaluated with a float model is
    an EvaluationError naming the uint8 inputs and the conversion (before: torch's RuntimeError
    'expected scalar type Byte but found Float'); a model that takes uint8 itself is let be."""
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.LazyLinear(3))
    images = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(6) % 3), batch_size=4)
    with pytest.raises(EvaluationError, match=r"uint8 images.*float32.*x\.float\(\) / 255"):
        accuracy(conv, loader)

    class TakesUint8(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = conv

        def forward(self, x):
            return self.inner(x.float() / 255)

    assert 0.0 <= accuracy(TakesUint8(), loader) <= 1.0
