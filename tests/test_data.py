"""Data tasks: batches are pure functions of (seed, step, rows); shares add up bitwise."""

import numpy as np
import pytest

from spectral_jax.data.lm_tasks import ByteCorpusLM, TokenShardLM, stdlib_corpus
from spectral_jax.data.prefetch import prefetch
from spectral_jax.data.tasks import Batch, LDSRegression, SelectiveCopying

SMALL_TASKS = [
    LDSRegression(seq_len=24, d_input=3, d_output=2, state_dim=5, noise_std=0.1),
    ByteCorpusLM(seq_len=32),
    SelectiveCopying(context_len=20, num_tokens=4, num_symbols=5),
]


def _assert_batches_equal(a: Batch, b: Batch) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("task", SMALL_TASKS, ids=lambda t: type(t).__name__)
def test_process_shares_reassemble_the_global_batch_bitwise(task):
    whole = task.batch(seed=7, step=3, rows=range(8))
    shares = [task.batch(seed=7, step=3, rows=range(p * 2, p * 2 + 2)) for p in range(4)]
    joined = Batch(*(np.concatenate(parts) for parts in zip(*shares, strict=True)))
    _assert_batches_equal(whole, joined)
    # Rows in another order are the same rows.
    reordered = task.batch(seed=7, step=3, rows=[5, 1])
    _assert_batches_equal(reordered, Batch(*(x[[5, 1]] for x in whole)))


@pytest.mark.parametrize("task", SMALL_TASKS, ids=lambda t: type(t).__name__)
def test_batches_depend_on_seed_step_and_split_only(task):
    a = task.batch(seed=1, step=2, rows=range(4))
    _assert_batches_equal(a, task.batch(seed=1, step=2, rows=range(4)))
    for other in (
        task.batch(seed=2, step=2, rows=range(4)),
        task.batch(seed=1, step=3, rows=range(4)),
        task.batch(seed=1, step=2, rows=range(4), split="eval"),
    ):
        assert not np.array_equal(a.inputs, other.inputs)
    # Rows of one batch are distinct sequences.
    assert not np.array_equal(a.inputs[0], a.inputs[1])


@pytest.mark.parametrize("task", SMALL_TASKS, ids=lambda t: type(t).__name__)
def test_batch_shapes_and_dtypes(task):
    b = task.batch(seed=0, step=0, rows=range(3))
    assert b.mask.shape == (3, task.seq_len) and b.mask.dtype == np.float32
    if task.kind == "tokens":
        assert b.inputs.shape == b.targets.shape == (3, task.seq_len)
        assert b.inputs.dtype == b.targets.dtype == np.int32
        assert 0 <= b.inputs.min() and b.inputs.max() < task.vocab_size
        assert 0 <= b.targets.min() and b.targets.max() < task.vocab_size
    else:
        assert b.inputs.shape == (3, task.seq_len, task.d_input)
        assert b.targets.shape == (3, task.seq_len, task.d_output)
        assert b.inputs.dtype == b.targets.dtype == np.float32


def test_lds_outputs_equal_a_direct_convolution_with_the_symmetric_system():
    """y_t = sum_s C A^(t-s) B u_s with A = Q diag(lam) Q^T built explicitly (float64)."""
    task = LDSRegression(seq_len=40, d_input=2, d_output=3, state_dim=6, spectral_radius=0.9)
    lam, b_eig, c_eig = task.system()
    assert np.isclose(np.max(np.abs(lam)), 0.9)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
    a_mat, b_mat, c_mat = q @ np.diag(lam) @ q.T, q @ b_eig, c_eig @ q.T
    np.testing.assert_allclose(a_mat, a_mat.T, atol=1e-15)
    batch = task.batch(seed=0, step=0, rows=[0, 1])
    u = batch.inputs.astype(np.float64)
    expected = np.zeros((2, 40, 3))
    for t in range(40):
        for s in range(t + 1):
            kernel = c_mat @ np.linalg.matrix_power(a_mat, t - s) @ b_mat
            expected[:, t] += u[:, s] @ kernel.T
    # The batch is the float64 simulation rounded to float32: half an ulp of float32.
    np.testing.assert_allclose(batch.targets, expected, rtol=2**-23, atol=2**-23)


def test_lds_outputs_have_unit_stationary_variance():
    task = LDSRegression(seq_len=512, d_input=2, d_output=2, state_dim=8, spectral_radius=0.9)
    y = task.batch(seed=0, step=0, rows=range(64)).targets[:, 256:]  # past the transient
    # 64 x 256 correlated samples; with correlation time ~1/(1-0.9)=10 the effective
    # sample size is ~1600, so the variance estimate has relative std ~ sqrt(2/1600) ~ 0.035.
    np.testing.assert_allclose(y.var(axis=(0, 1)), 1.0, rtol=0.2)


def test_lds_noise_is_added_with_the_requested_std():
    clean = LDSRegression(seq_len=64, state_dim=4)
    noisy = LDSRegression(seq_len=64, state_dim=4, noise_std=0.5)
    a = clean.batch(seed=3, step=0, rows=range(32))
    b = noisy.batch(seed=3, step=0, rows=range(32))
    np.testing.assert_array_equal(a.inputs, b.inputs)
    # 32*64*4 = 8192 noise samples: the std estimate is within ~1% (1 sigma).
    np.testing.assert_allclose((b.targets - a.targets).std(), 0.5, rtol=0.05)


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
    corpus = stdlib_corpus(5)
    assert corpus.num_train_files > 100 and corpus.num_valid_files > 5
    assert corpus.train.dtype == np.uint8 and corpus.train.size > 1_000_000
    assert corpus.valid.size > 10_000
    assert stdlib_corpus(5).fingerprint == corpus.fingerprint
    # A larger validation share moves files from train to validation, nothing else.
    wider = stdlib_corpus(10)
    assert wider.num_valid_files > corpus.num_valid_files
    total = corpus.train.size + corpus.valid.size
    assert wider.train.size + wider.valid.size == total


def test_byte_lm_targets_are_inputs_shifted_by_one_byte_from_the_corpus():
    task = ByteCorpusLM(seq_len=64)
    b = task.batch(seed=0, step=5, rows=range(3))
    np.testing.assert_array_equal(b.inputs[:, 1:], b.targets[:, :-1])
    stream = task.corpus().train.tobytes()
    for row in range(3):
        window = bytes(b.inputs[row].astype(np.uint8)) + bytes([b.targets[row, -1]])
        assert window in stream
    assert bytes(task.batch(0, 0, [0], "eval").inputs[0].astype(np.uint8)) in (
        task.corpus().valid.tobytes()
    )


def test_selective_copying_targets_are_the_context_symbols_in_order():
    task = SelectiveCopying(context_len=30, num_tokens=5, num_symbols=4)
    b = task.batch(seed=0, step=0, rows=range(6))
    marker = task.num_symbols + 1
    for row in range(6):
        context = b.inputs[row, :30]
        symbols = context[context != 0]
        assert symbols.size == 5 and symbols.min() >= 1 and symbols.max() <= 4
        np.testing.assert_array_equal(b.inputs[row, 30:], marker)
        np.testing.assert_array_equal(b.targets[row, 30:], symbols)
    np.testing.assert_array_equal(b.mask[:, :30], 0.0)
    np.testing.assert_array_equal(b.mask[:, 30:], 1.0)
    assert task.seq_len == 35 and task.vocab_size == 6


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: LDSRegression(spectral_radius=1.0), "spectral_radius"),
        (lambda: LDSRegression(state_dim=0), "state_dim"),
        (lambda: LDSRegression(noise_std=-1.0), "noise_std"),
        (lambda: ByteCorpusLM(val_percent=0), "val_percent"),
        (lambda: ByteCorpusLM(seq_len=-3), "seq_len"),
        (lambda: SelectiveCopying(context_len=4, num_tokens=5), "num_tokens"),
    ],
)
def test_bad_task_configs_name_the_field(factory, field):
    with pytest.raises(ValueError, match=field):
        factory()


def test_bad_batch_arguments_raise():
    task = SelectiveCopying(context_len=8, num_tokens=2)
    with pytest.raises(ValueError, match="split"):
        task.batch(0, 0, [0], split="test")
    with pytest.raises(ValueError, match="rows"):
        task.batch(0, 0, [])
    with pytest.raises(ValueError, match=">= 0"):
        task.batch(0, -1, [0])
    with pytest.raises(ValueError, match="too few"):
        ByteCorpusLM(seq_len=10**9).batch(0, 0, [0])


# --------------------------------------------------------------------------- token shards


@pytest.fixture(scope="module")
def token_task(tmp_path_factory):
    from spectral_jax.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(3)
    for i in range(30):
        (root / f"{i}.txt").write_text("".join(rng.choice(list("ab c\n"), 40)))
    out = root / "shards"
    prepare_data([str(root)], str(out), "bytes", val_percent=20.0, docs_per_shard=4)
    return TokenShardLM(str(out), seq_len=32, document_mask=True)


def test_token_shard_rows_are_the_same_for_one_and_two_processes(token_task):
    whole = token_task.batch(seed=5, step=9, rows=range(8))
    shares = [token_task.batch(seed=5, step=9, rows=range(p * 4, p * 4 + 4)) for p in range(2)]
    _assert_batches_equal(whole, Batch(*(np.concatenate(x) for x in zip(*shares, strict=True))))
    _assert_batches_equal(whole, token_task.batch(seed=5, step=9, rows=range(8)))
    assert not np.array_equal(whole.inputs, token_task.batch(seed=5, step=10, rows=range(8)).inputs)
    # Windows read across shard boundaries are slices of the split's token stream.
    stream = token_task.shards().splits["train"]
    tokens = stream.read(0, stream.tokens)
    assert len(stream.names) > 1
    for row_in, row_out in zip(whole.inputs, whole.targets, strict=True):
        np.testing.assert_array_equal(row_in[1:], row_out[:-1])
        assert any(np.array_equal(tokens[s : s + 32], row_in) for s in range(tokens.size - 32))


def test_document_mask_drops_the_prediction_across_end_of_text(token_task):
    b = token_task.batch(seed=0, step=0, rows=range(16))
    eot = token_task.text_tokenizer().eot_id
    assert (b.inputs == eot).any()
    np.testing.assert_array_equal(b.mask == 0, b.inputs == eot)


def test_eval_reports_bits_per_byte_from_the_manifest(token_task):
    metrics = token_task.eval_metrics(2.0)
    val = token_task.shards().manifest["splits"]["val"]
    assert metrics["bits_per_token"] == pytest.approx(2.0 / np.log(2), rel=1e-12)
    expected = metrics["bits_per_token"] * val["tokens"] / val["bytes"]
    assert metrics["bits_per_byte"] == pytest.approx(expected, rel=1e-12)


def test_prefetch_resumed_at_a_step_replays_the_uninterrupted_stream(token_task):
    make = lambda s: token_task.batch(seed=1, step=s, rows=range(2))  # noqa: E731
    whole = list(prefetch(make, range(6), depth=2))
    resumed = list(prefetch(make, range(3, 6), depth=3))
    for a, b in zip(whole[3:], resumed, strict=True):
        _assert_batches_equal(a, b)

    def fails_at_2(step):
        if step == 2:
            raise RuntimeError("no batch 2")
        return step

    got = []
    with pytest.raises(RuntimeError, match="no batch 2"):
        for item in prefetch(fails_at_2, range(5)):
            got.append(item)
    assert got == [0, 1]
