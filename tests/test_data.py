"""Data loaders: shapes, determinism, batch streams, clear errors for bad paths."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rdiag import data as D


def test_teacher_student_regression_and_classification() -> None:
    reg = D.teacher_student(32, 8, dim=5, outputs=2, seed=1)
    assert (
        reg.x.shape == (32, 5) and reg.y.shape == (32, 2) and reg.x_test.shape == (8, 5)
    )
    again = D.teacher_student(32, 8, dim=5, outputs=2, seed=1)
    assert torch.equal(reg.x, again.x) and torch.equal(reg.y, again.y)
    assert not torch.equal(reg.x, D.teacher_student(32, 8, dim=5, outputs=2, seed=2).x)
    cls = D.teacher_student(40, 8, dim=5, outputs=3, task="classification")
    assert cls.y.dtype == torch.int64 and set(cls.y.tolist()) <= {0, 1, 2}
    assert cls.num_outputs == 3 and cls.task == "classification"
    with pytest.raises(ValueError, match="task"):
        D.teacher_student(task="ranking")
    with pytest.raises(ValueError, match="outputs >= 2"):
        D.teacher_student(task="classification", outputs=1)


def test_digits_bundled_standardized() -> None:
    pytest.importorskip("sklearn")
    ds = D.digits(n_test=97)
    assert (
        ds.x.shape == (1700, 64)
        and ds.x_test.shape == (97, 64)
        and ds.num_outputs == 10
    )
    assert abs(float(ds.x.mean())) < 1e-4
    assert D.digits(flatten=False).x.shape[1:] == (1, 8, 8)


def _write_cifar(root, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for name in (*D.CIFAR_TRAIN, D.CIFAR_TEST):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reads_local_pickles(tmp_path) -> None:
    _write_cifar(tmp_path)
    ds = D.cifar10(tmp_path)
    assert (
        ds.x.shape == (30, 3, 32, 32)
        and ds.y.shape == (30,)
        and ds.x_test.shape[0] == 6
    )
    with open(tmp_path / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    px = torch.as_tensor(raw[b"data"]).reshape(-1, 3, 32, 32).float() / 255
    assert torch.equal(ds.y[:6], torch.tensor(raw[b"labels"]))
    # Per-channel standardization is affine, so correlation with raw pixels is 1.
    corr = np.corrcoef(px[:, 0].reshape(-1), ds.x[:6, 0].reshape(-1))[0, 1]
    assert corr == pytest.approx(1.0, abs=1e-6)
    assert len(D.cifar10(tmp_path, limit=4).x) == 4


def test_cifar10_bad_paths_and_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.cifar10(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        D.cifar10(tmp_path)
    _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="test_batch"):
        D.cifar10(tmp_path)
    with pytest.raises(ValueError, match="root"):
        D.load_data("cifar10")
    with pytest.raises(ValueError, match="data to be one of"):
        D.load_data("mnist")
    with pytest.raises(ValueError, match="bad data_options"):
        D.load_data("teacher", widht=3)


def test_from_tensors_infers_task() -> None:
    x = torch.randn(6, 3)
    assert D.from_tensors(x, torch.tensor([0, 1, 2, 0, 1, 1])).num_outputs == 3
    assert D.from_tensors(x, torch.randn(6)).y.shape == (6, 1)
    with pytest.raises(ValueError, match="as many targets"):
        D.from_tensors(x, torch.randn(5))


def test_batch_streams() -> None:
    ds = D.teacher_student(10, 2, dim=3)
    sgd = list(D.batches(ds, 4, 5, mode="sgd", seed=0))
    assert [len(b[0]) for b in sgd] == [4] * 5
    # Within one epoch no sample repeats.
    first = torch.cat([sgd[0][0], sgd[1][0]])
    assert len({tuple(r.tolist()) for r in first}) == 8
    gd = list(D.batches(ds, 4, 2, mode="gd"))
    assert all(torch.equal(b[0], ds.x) for b in gd)
    online = list(D.batches(ds, 4, 3, mode="online"))
    assert len({tuple(r.tolist()) for b in online for r in b[0]}) == 12  # fresh samples
    finite = D.from_tensors(ds.x, ds.y)
    with pytest.raises(ValueError, match="online SGD"):
        list(D.batches(finite, 4, 3, mode="online"))
    with pytest.raises(ValueError, match="optimizer mode"):
        list(D.batches(ds, 4, 3, mode="lbfgs"))
    assert D.teacher_student(4, 2).to(torch.float64).sampler(3, torch.Generator())[
        0
    ].dtype == (torch.float64)


def test_sequences_previous_token_task() -> None:
    ds = D.load_data("sequences", n_train=5, n_test=3, vocab=7, seq_len=4)
    assert ds.x.shape == (5, 4) and ds.y.shape == (5, 4) and ds.num_outputs == 7
    assert torch.equal(ds.y[:, 1:], ds.x[:, :-1]) and bool((ds.y[:, 0] == 0).all())


def test_probe_is_the_first_test_samples_and_never_truncated() -> None:
    data = D.load_data("teacher", n_train=8, n_test=5, dim=3)
    x, y = data.probe(3)
    assert torch.equal(x, data.x_test[:3]) and torch.equal(y, data.y_test[:3])
    with pytest.raises(ValueError, match="probe_size <= the 5 test samples, got 6"):
        data.probe(6)
    with pytest.raises(ValueError, match="probe_size to be a positive int"):
        data.probe(0)
