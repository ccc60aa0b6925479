"""Datasets for the harness: teacher-student, digits, local CIFAR-10, user tensors.

Every loader returns a :class:`Dataset` of tensors (no DataLoader), small enough to
live in memory; :func:`batches` turns one into the batch stream of an optimizer
mode (minibatch SGD, full-batch GD, online SGD). :func:`sample_batch` draws a
batch for a model when the user gives none (the meter's and ``rdiag ntk`` /
``sharpness --factory``'s default): its ``sample_inputs``, or Gaussian inputs
sized from its first ``nn.Linear``, and targets for the loss.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rdiag._checks import check_choice, check_positive_int
from rdiag._inputs import Inputs
from rdiag._optional import require
from rdiag.losses import infer_loss_kind
from rdiag.parametrization import Centered

TASKS = ("regression", "classification")
DATASETS = ("teacher", "digits", "cifar10", "sequences")
BATCH_MODES = ("sgd", "gd", "online")
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of one task.

    Attributes:
        x: Training inputs ``(N, *in_shape)``, floating.
        y: Training targets: ``(N, O)`` float (regression) or ``(N,)`` int64 labels.
        x_test: Test inputs ``(M, *in_shape)``.
        y_test: Test targets, as ``y``.
        task: ``"regression"`` or ``"classification"``.
        num_outputs: ``O`` (regression) or the number of classes.
        sampler: ``(n, generator) -> (x, y)`` drawing fresh samples (online SGD on
            synthetic data); ``None`` for finite datasets.
    """

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    task: str
    num_outputs: int
    sampler: Callable[[int, torch.Generator], tuple[Tensor, Tensor]] | None = None

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.x.shape[1:])

    def probe(self, size: int) -> tuple[Tensor, Tensor]:
        """The first ``size`` test samples, ``x (size, ...)`` and ``y (size, ...)``.

        Raises:
            ValueError: ``size`` is not a positive int or exceeds the test set.
        """
        check_positive_int(size, "probe_size")
        if size > len(self.x_test):
            raise ValueError(
                f"expected probe_size <= the {len(self.x_test)} test samples, got "
                f"{size}; lower probe_size or enlarge the test set (data_options "
                "n_test, or limit for cifar10)"
            )
        return self.x_test[:size], self.y_test[:size]

    def to(self, dtype: torch.dtype) -> Dataset:
        """A copy with floating tensors cast to ``dtype``.

        Args:
            dtype: Target floating dtype.

        Returns:
            The cast :class:`Dataset` (integer labels unchanged).
        """

        def cast(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        sampler = self.sampler
        if sampler is not None:
            inner = sampler

            def sampler(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
                x, y = inner(n, g)
                return cast(x), cast(y)

        return Dataset(
            cast(self.x),
            cast(self.y),
            cast(self.x_test),
            cast(self.y_test),
            self.task,
            self.num_outputs,
            sampler,
        )


def teacher_student(
    n_train: int = 512,
    n_test: int = 256,
    *,
    dim: int = 16,
    outputs: int = 1,
    task: str = "regression",
    teacher_width: int = 64,
    noise: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Synthetic data labelled by a random two-layer tanh teacher.

    Inputs are standard Gaussian in ``dim`` dimensions. The teacher is
    ``t(x) = a^T tanh(W x / sqrt(dim)) / sqrt(teacher_width)`` with standard Gaussian
    ``W (teacher_width, dim)``, ``a (teacher_width, outputs)``; regression targets
    are ``t(x) + noise * eps`` ``(N, outputs)``, classification labels
    ``argmax t(x)`` ``(N,)`` with ``outputs >= 2`` classes. Fresh samples from the
    same teacher are available through ``Dataset.sampler`` (online SGD).

    Args:
        n_train: Training samples.
        n_test: Test samples.
        dim: Input dimension.
        outputs: Output dimension / number of classes.
        task: ``"regression"`` or ``"classification"``.
        teacher_width: Hidden width of the teacher.
        noise: Standard deviation of label noise (regression).
        seed: Seed of the teacher and of the samples.

    Returns:
        The :class:`Dataset` (float32).

    Raises:
        ValueError: A size is not a positive int, an unknown ``task``, or fewer than
            two classes for classification.
    """
    for name, v in (
        ("n_train", n_train),
        ("n_test", n_test),
        ("dim", dim),
        ("outputs", outputs),
        ("teacher_width", teacher_width),
    ):
        check_positive_int(v, name)
    check_choice(task, "task", TASKS)
    if task == "classification" and outputs < 2:
        raise ValueError(
            f"expected outputs >= 2 classes for classification, got {outputs}"
        )
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(teacher_width, dim, generator=g)
    a = torch.randn(teacher_width, outputs, generator=g)

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, dim, generator=gen)
        t = torch.tanh(x @ w.T / dim**0.5) @ a / teacher_width**0.5
        if task == "classification":
            return x, t.argmax(1)
        return x, t + noise * torch.randn(t.shape, generator=gen)

    x, y = sample(n_train, g)
    xt, yt = sample(n_test, g)
    return Dataset(x, y, xt, yt, task, outputs, sample)


def sequences(
    n_train: int = 512,
    n_test: int = 256,
    *,
    vocab: int = 16,
    seq_len: int = 6,
    seed: int = 0,
) -> Dataset:
    """Synthetic token task for the transformer: predict the previous token.

    Inputs are uniform token ids ``(N, seq_len)``; the label at position ``t`` is the
    token at ``t - 1`` (0 at ``t = 0``), ``(N, seq_len)`` int64, so a causal model
    must attend one position back. Fresh samples via ``Dataset.sampler``.

    Args:
        n_train: Training sequences.
        n_test: Test sequences.
        vocab: Vocabulary size (classes per position).
        seq_len: Sequence length.
        seed: Seed of the samples.

    Returns:
        The :class:`Dataset` (classification over ``vocab`` classes per token).
    """
    for name, v in (
        ("n_train", n_train),
        ("n_test", n_test),
        ("vocab", vocab),
        ("seq_len", seq_len),
    ):
        check_positive_int(v, name)

    def sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, vocab, (n, seq_len), generator=gen)
        y = torch.cat([torch.zeros(n, 1, dtype=torch.int64), x[:, :-1]], dim=1)
        return x, y

    g = torch.Generator().manual_seed(seed)
    x, y = sample(n_train, g)
    xt, yt = sample(n_test, g)
    return Dataset(x, y, xt, yt, "classification", vocab, sample)


def digits(n_test: int = 297, *, seed: int = 0, flatten: bool = True) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes; no download).

    Pixels (0..16) are standardized with the training mean and standard deviation.

    Args:
        n_test: Samples held out for testing (shuffled split by ``seed``).
        seed: Seed of the split.
        flatten: Inputs ``(N, 64)`` if True, else images ``(N, 1, 8, 8)``.

    Returns:
        The :class:`Dataset` (float32, classification, 10 classes).

    Raises:
        ValueError: ``n_test`` outside ``(0, 1797)``.
        ImportError: scikit-learn is not installed (``pip install 'rdiag[data]'``).
    """
    datasets = require("sklearn.datasets", "rdiag.data.digits")
    bunch = datasets.load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    if not 0 < n_test < len(x):
        raise ValueError(f"expected 0 < n_test < {len(x)}, got {n_test}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    x_train, x_test = x[n_test:], x[:n_test]
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if not flatten:
        x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    return Dataset(x_train, y[n_test:], x_test, y[:n_test], "classification", 10)


def _read_cifar_file(path: Path) -> tuple[Tensor, Tensor]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated or foreign file
        raise ValueError(
            f"could not read the CIFAR-10 batch {path} ({type(err).__name__}: {err}); "
            "expected the python-pickle format of cifar-10-python.tar.gz"
        ) from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = list(batch)[:5] if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"expected {path} to be a CIFAR-10 batch dict with b'data' and b'labels', got "
            f"{keys}; point root at the extracted cifar-10-batches-py directory"
        )
    data = torch.as_tensor(batch[b"data"]).reshape(-1, 3, 32, 32)
    return data, torch.as_tensor(list(batch[b"labels"]), dtype=torch.int64)


def cifar10(
    root: str | Path,
    *,
    train_files: tuple[str, ...] = CIFAR_TRAIN,
    limit: int | None = None,
) -> Dataset:
    """CIFAR-10 from a local directory in its standard python-pickle format.

    Reads ``root/data_batch_1..5`` and ``root/test_batch`` (the extracted
    ``cifar-10-batches-py``); nothing is downloaded. Pixels are scaled to [0, 1]
    and standardized per channel with the training statistics.

    Args:
        root: Directory holding the batch files.
        train_files: Training batch file names to read.
        limit: Keep at most this many training and test samples.

    Returns:
        The :class:`Dataset`: inputs ``(N, 3, 32, 32)`` float32, labels ``(N,)``.

    Raises:
        FileNotFoundError: ``root`` or a batch file is missing (the message lists
            what is expected).
        ValueError: A file is not a CIFAR-10 batch.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"expected a CIFAR-10 directory (cifar-10-batches-py with data_batch_1..5 and "
            f"test_batch), got {root}, which does not exist or is not a directory; "
            "download and extract cifar-10-python.tar.gz there"
        )
    missing = [n for n in (*train_files, CIFAR_TEST) if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"expected CIFAR-10 batch files {missing} in {root}; found "
            f"{sorted(p.name for p in root.iterdir())[:10]}; point root at the extracted "
            "cifar-10-batches-py directory"
        )
    parts = [_read_cifar_file(root / n) for n in train_files]
    x = torch.cat([p[0] for p in parts])[:limit]
    y = torch.cat([p[1] for p in parts])[:limit]
    xt, yt = _read_cifar_file(root / CIFAR_TEST)
    xt, yt = xt[:limit], yt[:limit]
    x, xt = x.float() / 255, xt.float() / 255
    mean = x.mean((0, 2, 3), keepdim=True)
    std = x.std((0, 2, 3), keepdim=True).clamp_min(1e-3)
    return Dataset((x - mean) / std, y, (xt - mean) / std, yt, "classification", 10)


def from_tensors(
    x: Tensor,
    y: Tensor,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    *,
    num_classes: int | None = None,
) -> Dataset:
    """Wrap user tensors: integer ``y (N,)`` means classification, float regression.

    Args:
        x: Inputs ``(N, ...)``.
        y: Labels ``(N,)`` int or targets ``(N,)`` / ``(N, O)`` float.
        x_test: Test inputs (default: the training inputs).
        y_test: Test targets (default: the training targets).
        num_classes: Classes (default ``max(y) + 1``).

    Returns:
        The :class:`Dataset`.

    Raises:
        TypeError: ``x`` or ``y`` is not a tensor.
        ValueError: Empty or mismatched batches, or integer inputs.
    """
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"expected {name} to be a torch.Tensor, got {type(t).__name__}"
            )
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"expected as many targets as inputs (> 0), got x {tuple(x.shape)} and "
            f"y {tuple(y.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"expected floating inputs, got {x.dtype}; cast with x.float()"
        )
    x_test = x if x_test is None else x_test
    y_test = y if y_test is None else y_test
    if y.is_floating_point():
        y, y_test = y.reshape(len(y), -1), y_test.reshape(len(y_test), -1)
        return Dataset(x, y, x_test, y_test, "regression", y.shape[1])
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    return Dataset(x, y.long(), x_test, y_test.long(), "classification", classes)


def load_data(name: str, **options: object) -> Dataset:
    """Build a dataset by name: ``"teacher"``, ``"digits"``, ``"cifar10"``, ``"sequences"``.

    Args:
        name: Dataset name.
        **options: Keyword arguments of :func:`teacher_student`, :func:`digits` or
            :func:`cifar10` (which needs ``root=``) or :func:`sequences`.

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: Unknown name, CIFAR-10 without ``root``, or bad options.
        FileNotFoundError: A missing CIFAR-10 directory or file.
    """
    check_choice(name, "data", DATASETS)
    if name == "cifar10" and "root" not in options:
        raise ValueError(
            "expected data_options.root (the cifar-10-batches-py directory) for "
            "data='cifar10', got none; add root: /path/to/cifar-10-batches-py"
        )
    builder = {
        "teacher": teacher_student,
        "digits": digits,
        "cifar10": cifar10,
        "sequences": sequences,
    }[name]
    try:
        return builder(**options)
    except TypeError as err:
        raise ValueError(f"bad data_options for data={name!r}: {err}") from err


def batches(
    data: Dataset, batch_size: int, steps: int, *, mode: str = "sgd", seed: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """The batch stream of ``steps`` optimizer steps.

    Modes: ``"sgd"``: minibatches of a reshuffled epoch (without replacement within
    an epoch); ``"gd"``: the whole training set every step (``batch_size``
    ignored); ``"online"``: every sample is used once: fresh samples from
    ``data.sampler`` when available, else consecutive slices of one shuffled pass
    (error if ``steps * batch_size`` exceeds the training set).

    Args:
        data: The dataset.
        batch_size: Samples per step (``B``).
        steps: Number of batches.
        mode: ``"sgd"``, ``"gd"`` or ``"online"``.
        seed: Seed of the shuffling / sampling.

    Yields:
        ``(x (B, ...), y (B, ...))``.

    Raises:
        ValueError: Unknown mode, a batch larger than the training set, or an online
            pass longer than a finite training set.
    """
    check_choice(mode, "optimizer mode", BATCH_MODES)
    check_positive_int(batch_size, "batch_size")
    g = torch.Generator().manual_seed(seed)
    n = len(data.x)
    if mode == "gd":
        for _ in range(steps):
            yield data.x, data.y
        return
    if mode == "online" and data.sampler is not None:
        for _ in range(steps):
            yield data.sampler(batch_size, g)
        return
    if mode == "online" and steps * batch_size > n:
        raise ValueError(
            f"expected steps * batch_size <= {n} training samples for online SGD on a "
            f"finite dataset, got {steps} * {batch_size}; use optimizer 'sgd', fewer "
            "steps, or synthetic data (fresh samples)"
        )
    if batch_size > n:
        raise ValueError(
            f"expected batch_size <= {n} training samples, got {batch_size}"
        )
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        yield data.x[idx], data.y[idx]


# ---- a batch for a model ---------------------------------------------------------
def sample_inputs(model: nn.Module, n: int, generator: torch.Generator) -> Inputs:
    """``n`` inputs for ``model``: its own ``sample_inputs``, else Gaussian for its first layer.

    A model with ``sample_inputs(n, generator)`` (rdiag's built-in ones; a
    :class:`~rdiag.parametrization.Centered` wrapper's inner model is asked)
    draws them; otherwise the first module that holds parameters (registration
    order) must be an ``nn.Linear``, and the inputs are standard normal
    ``(n, in_features)`` in its weight's dtype.

    Args:
        model: The network.
        n: Batch size ``N``.
        generator: The random generator (CPU).

    Returns:
        ``x`` of shape ``(N, ...)``.

    Raises:
        TypeError: No ``sample_inputs`` and a first layer whose input size is not
            known from the layer (a convolution: spatial size; an embedding:
            sequence length), or no parameters at all.
    """
    inner = model.model if isinstance(model, Centered) else model
    if callable(getattr(inner, "sample_inputs", None)):
        return inner.sample_inputs(n, generator)
    first = next(
        (
            m
            for m in inner.modules()
            if next(m.parameters(recurse=False), None) is not None
        ),
        None,
    )
    if isinstance(first, nn.Linear):
        x = torch.randn(n, first.in_features, generator=generator)
        return x.to(first.weight.dtype)
    found = "no parameters" if first is None else f"the first layer {first}"
    raise TypeError(
        f"expected a model with sample_inputs(n, generator) or a first layer "
        f"nn.Linear to size Gaussian inputs from, got {type(inner).__name__} with "
        f"{found}, whose input shape the layer does not tell; pass data=(x, y) "
        "(on the command line: --data-factory MODULE:FUNCTION returning (x, y))"
    )


def sample_batch(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    n: int = 16,
    seed: int = 1234,
) -> tuple[Inputs, Tensor]:
    """A batch ``(x, y)`` for ``model`` and ``loss_fn``, drawn from one ``seed``.

    The inputs are :func:`sample_inputs`; the targets are shaped like the model's
    output on them (evaluated in eval mode; the model is left as it was): standard normal for a regression loss, uniform class indices
    over the last output axis for cross-entropy (``(N,)`` for ``(N, C)``
    outputs, ``(N, T)`` for ``(N, T, V)``).

    Args:
        model: The network.
        loss_fn: The training loss (:func:`rdiag.losses.infer_loss_kind` decides
            the targets).
        n: Batch size ``N``.
        seed: Seed of the inputs and targets.

    Returns:
        ``(x (N, ...), y)``.

    Raises:
        TypeError: As :func:`sample_inputs`.
    """
    check_positive_int(n, "n")
    gen = torch.Generator().manual_seed(seed)
    x = sample_inputs(model, n, gen)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # no batch-norm statistics update, no dropout
        with torch.no_grad():
            out = model(x)
    finally:
        for m, training in modes:
            m.training = training
    if infer_loss_kind(loss_fn) != "cross_entropy":
        return x, torch.randn(out.shape, generator=gen)
    shape = out.shape[:-1] if out.dim() >= 3 else out.shape[:1]
    return x, torch.randint(0, out.shape[-1], shape, generator=gen)
