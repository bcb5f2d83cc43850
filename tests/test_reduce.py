"""Per-channel reduction of tensordot distilled layers (:mod:`spectral_jax.distill.reduce`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.distill.block_tables import block_tables
from spectral_jax.distill.fit import fit_lds_bank
from spectral_jax.distill.reduce import channel_groups, reduce_channels
from spectral_jax.nn.distillation import distill_model, layer_blocks
from spectral_jax.nn.lds_layer import distill_stu
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.nn.stu import STU, STUConfig

U32 = 2.0**-24
L, K, STATES = 64, 6, 40


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECTRAL_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        return fit_lds_bank(L, K, "standard", STATES)[0]


def test_a_small_system_reduces_to_itself():
    decays = np.asarray([0.9, 0.5, -0.3], np.float32).astype(np.float64)
    readout = np.asarray([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]])
    reduced = reduce_channels(decays, readout, length=L, tol=1e-9)
    # three real states: two blocks, the second's partner state empty
    assert list(reduced.states) == [3, 3] and reduced.slots == 2
    for c in range(2):
        order = np.argsort(reduced.decays[c].real)
        # the balanced eigenvalues are the decays to float64 round-off, which the float32
        # rounding removes exactly: the decays come back bit for bit
        np.testing.assert_array_equal(reduced.decays[c, order], np.sort(decays))
        # the refit readout is exact up to the float64 least squares' round-off (~1e-13 here)
        np.testing.assert_allclose(reduced.readout[c, order].real, readout[c, np.argsort(decays)],
                                   rtol=0, atol=1e-10)  # fmt: skip
    assert reduced.error.max() <= 1e-12


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_the_bound_holds_on_random_channels(bank, tol):
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(2, K, 8)) / np.sqrt(K)  # M_filt of both branches, 8 channels
    readout = np.concatenate([bank.coeffs @ mix[0], bank.coeffs @ mix[1]]).T  # [C, S * n]
    reduced = reduce_channels(bank.branch_decays().reshape(-1), readout, L, tol)
    # measured (with float32-rounded decays, refitted) <= tol and <= the balanced-truncation
    # bound of the states kept (the bound alone would keep more states: it exceeds the error)
    assert np.all(reduced.error <= tol) and np.all(reduced.error <= reduced.bound)
    assert reduced.states.max() < bank.num_states
    # the real blocks hold one float32 per state (pairs and real decays mixed here), and their
    # kernels are the slots': the same float64 sums regrouped, to round-off of ~1e-15
    assert np.any(reduced.decays.imag != 0) and np.any(reduced.decays.imag == 0)
    mu, weights = reduced.blocks()
    assert reduced.slots * 2 <= reduced.states.max() + 1
    kernels = block_tables(mu, weights, L)[2]
    t = np.arange(L)[:, None, None]
    slot_kernels = np.sum((reduced.decays**t * reduced.readout).real, axis=-1)
    np.testing.assert_allclose(kernels, slot_kernels, rtol=0, atol=1e-12)
    # the padded slots are empty
    for c, slots in enumerate(reduced.decays):
        used = np.flatnonzero(slots)
        assert np.all(reduced.readout[c, used.size :] == 0) and used.size <= reduced.states[c]


@pytest.mark.slow  # ~40 s on the shared CPU; test_lds_layer.py's tensordot-plain cases (reduced
# by default) cover step == prefill, past max_len, within the fast suite
def test_reduced_layer_steps_as_it_prefills_past_max_len(bank):
    cfg = STUConfig(3, 4, L, K, "standard", "tensordot", k_u=2, k_y=1)
    stu = STU(cfg, rngs=nnx.Rngs(0))
    layer, report = distill_stu(stu, bank, tol=1e-6)
    assert 0 < layer.config.slots < bank.num_states and report["error_max"] <= 1e-6
    x = jax.random.normal(jax.random.key(1), (2, 2 * L + 3, 3))
    y, cache = layer.prefill(x)
    reference, _ = layer.prefill(x, scan="sequential")
    step = nnx.jit(lambda layer, carry, x_t: layer.step(carry, x_t))
    carry, outs = layer.init_cache(2, 1), []
    for t in range(x.shape[1]):
        carry, y_t = step(layer, carry, x[:, t])
        outs.append(y_t)
    scale = float(jnp.abs(y).max())
    # float32 sums over at most 2L+3 positions of decaying slots read by a readout of norm
    # ~1 per channel: a few sqrt(T) float32 round-offs of the largest output
    atol = 8 * np.sqrt(x.shape[1]) * U32 * scale
    np.testing.assert_allclose(jnp.stack(outs, 1), y, rtol=0, atol=atol)
    np.testing.assert_allclose(reference, y, rtol=0, atol=atol)
    leaves = jax.tree.leaves(carry.state), jax.tree.leaves(cache.state)
    for stepped, prefilled in zip(*leaves, strict=True):  # two planes per group
        state_scale = float(jnp.abs(prefilled).max())
        np.testing.assert_allclose(stepped, prefilled, rtol=0, atol=atol / scale * state_scale)
    # the reduced kernels match the STU's within the tolerance (plus float32 FFT rounding)
    y_stu = np.asarray(stu(x[:, :L]), np.float64)
    rel = np.linalg.norm(np.asarray(y[:, :L]) - y_stu) / np.linalg.norm(y_stu)
    assert rel <= 4 * 1e-6 + 2 * np.sqrt(L) * U32


def test_reduced_checkpoint_template_restores(bank):
    cfg = ModelConfig(
        d_model=4, num_layers=2, max_len=L, vocab_size=7, num_filters=K,
        stu_projection="tensordot",
    )  # fmt: skip
    distilled, banks = distill_model(SpectralModel(cfg, rngs=nnx.Rngs(0)), num_states=STATES)
    blocks = layer_blocks(banks)
    assert all(len(b) == 4 and min(b) > 0 for b in blocks)
    template = distill_model(
        SpectralModel(cfg, rngs=nnx.Rngs(1)), num_states=STATES, blocks=blocks
    ).model
    pure = nnx.to_pure_dict(nnx.state(distilled))
    state = nnx.state(template)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(template, state)
    tokens = jax.random.randint(jax.random.key(0), (2, L), 0, 7)
    np.testing.assert_array_equal(template(tokens), distilled(tokens))


def test_channel_groups_pad_the_fewest_blocks():
    rng = np.random.default_rng(3)
    for _ in range(20):
        counts = rng.integers(1, 9, size=int(rng.integers(1, 8)))
        groups = channel_groups(counts, max_groups=2)
        # every channel exactly once, each group padded to its largest count
        assert sorted(c for channels, _ in groups for c in channels) == list(range(counts.size))
        assert all(slots == counts[list(channels)].max() for channels, slots in groups)
        padded = sum(slots * len(channels) for channels, slots in groups)
        # brute force over every split of the channels into two sets (or one)
        best = counts.max() * counts.size
        for mask in range(1, 2**counts.size - 1):
            side = np.asarray([(mask >> i) & 1 for i in range(counts.size)], bool)
            best = min(best, counts[side].max() * side.sum() + counts[~side].max() * (~side).sum())
        assert padded == best
        # one group when a second does not pad fewer blocks
        assert len(groups) == 1 or padded < counts.max() * counts.size


def test_grouped_channels_step_as_they_prefill(bank):
    stu = STU(STUConfig(3, 4, L, K, "standard", "tensordot"), rngs=nnx.Rngs(0))
    for name in ("M_filt_plus", "M_filt_minus"):  # channel 1: the first filter alone
        getattr(stu, name)[...] = getattr(stu, name)[...].at[1:, 1].set(0.0)
    layer, report = distill_stu(stu, bank, tol=1e-6)
    groups = layer.config.groups
    # channel 1 needs the fewest blocks: two groups, the channels out of order across them
    assert len(groups) == 2 and groups[0][0] == (1,) and report["groups"] == 2
    assert report["state_floats"] == 2 * sum(slots * len(ch) for ch, slots in groups)
    x = jax.random.normal(jax.random.key(1), (2, L + 5, 3))
    y, cache = layer.prefill(x)
    # per group one complex array [B, P_g, C_g]: each block's two real states
    assert [(s.shape, s.dtype) for s in cache.state] == [
        ((2, p, len(ch)), jnp.complex64) for ch, p in groups
    ]
    sequential, _ = layer.prefill(x, scan="sequential")
    head, carry = layer.prefill(x[:, :-3])
    steps = []
    for t in range(x.shape[1] - 3, x.shape[1]):
        carry, y_t = layer.step(carry, x[:, t])
        steps.append(y_t)
    scale = float(jnp.abs(y).max())
    # float32 sums over at most L+5 positions of decaying blocks: a few sqrt(T) round-offs
    atol = 8 * np.sqrt(x.shape[1]) * U32 * scale
    np.testing.assert_allclose(sequential, y, rtol=0, atol=atol)
    np.testing.assert_allclose(jnp.stack(steps, 1), y[:, -3:], rtol=0, atol=atol)
    np.testing.assert_allclose(head, y[:, :-3], rtol=0, atol=atol)
    # each channel's output is its own (the groups' outputs return to channel order): the
    # reduced layer matches the STU within the tolerance plus float32 FFT rounding
    y_stu = np.asarray(stu(x[:, :L]), np.float64)
    for c in range(4):
        rel = np.linalg.norm(np.asarray(y[:, :L, c]) - y_stu[..., c]) / np.linalg.norm(
            y_stu[..., c]
        )
        assert rel <= 4 * 1e-6 + 2 * np.sqrt(L) * U32
