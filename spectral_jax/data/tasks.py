"""Training tasks: every batch is a pure function of (seed, step, rows).

A *row* is one sequence of the global batch, named by its global index. Each row is
drawn from its own NumPy generator seeded with ``(seed, split, step, row)``, so a
process that loads only its share of the global batch (the rows its devices hold,
see ``sharding.process_rows``) produces exactly the rows a single process would, and
resuming at step ``s`` replays the same stream. Nothing is downloaded: the byte-level
corpus is the running Python's standard library source, and token shards are local files or
``gs://`` objects written by ``spectral-jax prepare-data`` (or flash-stu-2's ``.npy`` shards).

Tasks (frozen dataclasses, validated on construction); the language-model tasks live in
:mod:`spectral_jax.data.lm_tasks`:

- ``LDSRegression``: inputs ``u`` and outputs ``y`` of one random stable symmetric LDS.
- ``ByteCorpusLM``: next-byte prediction on the standard library source files.
- ``TokenShardLM``: next-token prediction on a directory of token shards.
- ``SelectiveCopying``: recall the few symbols scattered in a long blank context.

Every task follows the ``Task`` protocol: ``batch(seed, step, rows, split) -> Batch``
with ``split`` in ``("train", "eval")`` (the eval split is a fixed set of sequences
disjoint from training: a separate random stream, or the held-out files of the corpus),
its loss ``kind``, ``seq_len``, and ``eval_metrics(mean_loss)``, the task's own
evaluation figures (bits per byte for a byte LM).
Text tasks also have ``text_tokenizer()`` (their ``Tokenizer``; ``None`` for the others).

``spectral_jax.data.prefetch`` computes the batches of the coming steps in a background thread.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Protocol, get_args, runtime_checkable

import numpy as np

from spectral_jax.data.tokenizer import (
    Tokenizer,
)
from spectral_jax.validation import positive_int

Split = Literal["train", "eval"]
_SPLIT_IDS = {"train": 0, "eval": 1}
LossKind = Literal["tokens", "regression"]
"""``tokens``: the model outputs logits ``[B, L, V]``, cross-entropy against int
targets; ``regression``: outputs ``[B, L, d_output]``, mean squared error."""
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)


class Batch(NamedTuple):
    """One (share of a) batch; ``b`` rows of length ``L``.

    inputs:  [b, L] int32 tokens, or [b, L, d_input] float32.
    targets: [b, L] int32 tokens, or [b, L, d_output] float32.
    mask:    [b, L] float32 loss weights (1 where the loss counts, else 0).
    """

    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def row_rng(seed: int, split: Split, step: int, row: int, salt: int) -> np.random.Generator:
    """The generator of one row: independent of which process draws it."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    seed, step, row = (
        positive_int("", n, v, minimum=0)
        for n, v in zip(("seed", "step", "row"), (seed, step, row), strict=True)
    )
    return np.random.default_rng([salt, seed, _SPLIT_IDS[split], step, row])


def rows_array(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or rows.size == 0:
        raise ValueError(f"rows must be a non-empty 1-D sequence of row indices, got {rows!r}")
    return rows


@runtime_checkable
class Task(Protocol):
    """What the training loop needs from a task, whatever its class.

    A task is a frozen dataclass (its fields go into every checkpoint's run record, and a
    resumed run must have the same ones) with:

    - ``kind``: the loss (``LossKind``); a ``tokens`` task also has ``vocab_size``, a
      ``regression`` task ``d_output`` (the model's output width is checked against them).
    - ``seq_len``: the length ``L`` of every row.
    - ``batch(seed, step, rows, split)``: the rows (global indices) of one batch, a pure
      function of its arguments, as a ``Batch`` of ``[len(rows), L, ...]`` NumPy arrays.
    - ``eval_metrics(mean_loss)``: the task's own figures derived from the eval split's
      mask-weighted mean loss (natural units), e.g. ``{"bits_per_byte": ...}``; ``{}`` if none.
    - ``text_tokenizer()``: the ``Tokenizer`` that turns text into the task's tokens (saved with
      every checkpoint, so generation needs no extra flags), ``None`` for non-text tasks.
    """

    @property
    def kind(self) -> LossKind: ...

    @property
    def seq_len(self) -> int: ...

    def batch(self, seed: int, step: int, rows, split: Split = "train") -> Batch: ...

    def eval_metrics(self, mean_loss: float) -> dict[str, float]: ...

    def text_tokenizer(self) -> Tokenizer | None: ...


# --------------------------------------------------------------------------- LDS regression


@dataclasses.dataclass(frozen=True)
class LDSRegression:
    """Regression on a random stable symmetric LDS.

    ``x_t = A x_{t-1} + B u_t``, ``y_t = C x_t + noise``, ``u_t ~ N(0, I)``, with
    ``A = Q diag(lam) Q^T`` symmetric and ``max |lam| = spectral_radius``. Gaussian
    ``B`` and ``C`` are rotation invariant, so the system is simulated in the
    eigenbasis of ``A`` (a diagonal recurrence). ``C`` is scaled so each output has
    unit stationary variance before noise. The system depends on ``system_seed``
    only; the data seed picks the input and noise sequences.
    """

    seq_len: int = 256
    d_input: int = 4
    d_output: int = 4
    state_dim: int = 16
    spectral_radius: float = 0.99
    noise_std: float = 0.0
    system_seed: int = 0

    kind = "regression"

    def __post_init__(self):
        for name in ("seq_len", "d_input", "d_output", "state_dim"):
            positive_int("LDSRegression", name, getattr(self, name))
        if not 0.0 < self.spectral_radius < 1.0:
            raise ValueError(
                f"spectral_radius must be in (0, 1) for a stable LDS, got {self.spectral_radius}"
            )
        if not self.noise_std >= 0.0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.system_seed < 0:
            raise ValueError(f"system_seed must be >= 0, got {self.system_seed}")

    def text_tokenizer(self) -> None:
        return None

    def system(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The LDS in the eigenbasis of A: ``lam: [n]``, ``B: [n, d_in]``, ``C: [d_out, n]``."""
        return _lds_system(self)

    def eval_metrics(self, mean_loss: float) -> dict[str, float]:
        """None beyond the loss (the MSE; outputs have unit variance before noise)."""
        return {}

    def batch(self, seed: int, step: int, rows, split: Split = "train") -> Batch:
        rows = rows_array(rows)
        lam, b_mat, c_mat = self.system()
        u = np.empty((rows.size, self.seq_len, self.d_input))
        noise = np.zeros((rows.size, self.seq_len, self.d_output))
        for i, row in enumerate(rows):
            rng = row_rng(seed, split, step, row, salt=1)
            u[i] = rng.standard_normal((self.seq_len, self.d_input))
            if self.noise_std > 0:
                noise[i] = self.noise_std * rng.standard_normal((self.seq_len, self.d_output))
        drive = np.einsum("ni,bti->btn", b_mat, u)  # elementwise loops: per-row exact
        states = np.empty_like(drive)
        x = np.zeros((rows.size, self.state_dim))
        for t in range(self.seq_len):
            x = lam * x + drive[:, t]
            states[:, t] = x
        y = np.einsum("on,btn->bto", c_mat, states) + noise
        mask = np.ones((rows.size, self.seq_len), np.float32)
        return Batch(u.astype(np.float32), y.astype(np.float32), mask)


@functools.lru_cache(maxsize=16)
def _lds_system(task: LDSRegression) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng([0x1D5, task.system_seed])
    n = task.state_dim
    lam = rng.uniform(-task.spectral_radius, task.spectral_radius, n)
    lam[np.argmax(np.abs(lam))] = task.spectral_radius * np.sign(lam[np.argmax(np.abs(lam))])
    b_mat = rng.standard_normal((n, task.d_input)) / np.sqrt(task.d_input)
    c_mat = rng.standard_normal((task.d_output, n)) / np.sqrt(n)
    # Stationary output variance for white unit inputs:
    # var_o = sum_{k,l} C_ok C_ol (B B^T)_kl / (1 - lam_k lam_l).
    gram = (b_mat @ b_mat.T) / (1.0 - np.outer(lam, lam))
    var = np.einsum("ok,kl,ol->o", c_mat, gram, c_mat)
    c_mat = c_mat / np.sqrt(var)[:, None]
    return lam, b_mat, c_mat


# --------------------------------------------------------------------------- selective copying


@dataclasses.dataclass(frozen=True)
class SelectiveCopying:
    """Selective copying: a long-range recall task on tokens.

    A context of ``context_len`` tokens is blank (0) except for ``num_tokens``
    symbols (1..num_symbols) at random positions; then ``num_tokens`` marker tokens
    (``num_symbols + 1``) follow. At the i-th marker the target is the i-th symbol
    of the context, in order; only those positions count in the loss.
    """

    context_len: int = 256
    num_tokens: int = 8
    num_symbols: int = 8

    kind = "tokens"

    def __post_init__(self):
        for name in ("context_len", "num_tokens", "num_symbols"):
            positive_int("SelectiveCopying", name, getattr(self, name))
        if self.num_tokens > self.context_len:
            raise ValueError(
                f"num_tokens must be <= context_len={self.context_len}, got {self.num_tokens}"
            )

    @property
    def seq_len(self) -> int:
        return self.context_len + self.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 2

    def text_tokenizer(self) -> None:
        return None

    def eval_metrics(self, mean_loss: float) -> dict[str, float]:
        """None beyond the loss and the accuracy the loop reports for every token task."""
        return {}

    def batch(self, seed: int, step: int, rows, split: Split = "train") -> Batch:
        rows = rows_array(rows)
        inputs = np.zeros((rows.size, self.seq_len), np.int32)
        targets = np.zeros((rows.size, self.seq_len), np.int32)
        inputs[:, self.context_len :] = self.num_symbols + 1
        for i, row in enumerate(rows):
            rng = row_rng(seed, split, step, row, salt=3)
            positions = np.sort(rng.choice(self.context_len, self.num_tokens, replace=False))
            symbols = rng.integers(1, self.num_symbols + 1, self.num_tokens)
            inputs[i, positions] = symbols
            targets[i, self.context_len :] = symbols
        mask = np.zeros((rows.size, self.seq_len), np.float32)
        mask[:, self.context_len :] = 1.0
        return Batch(inputs, targets, mask)
