"""Flash STU checkpoints: a state dict written here in flash-stu-2's key layout from known arrays
loads, maps every key and gives the logits of a float64 NumPy FlashSTU forward written from the
semantics (issue 17); save then load is the identity; bad files say what is wrong. torch is not
needed."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from spectral_jax.apps import cli
from spectral_jax.decode.generate import prefill
from spectral_jax.interop import flashstu
from spectral_jax.nn.attention import alibi_slopes
from spectral_jax.nn.mixer import DecodeOptions
from spectral_jax.train import load_for_inference

# d_model 12 with 3 heads (not a power of two), window_size 4 (5 keys) < seq_len 16
BASE = {
    "n_embd": 12,
    "n_heads": 3,
    "seq_len": 16,
    "window_size": 4,
    "vocab_size": 23,
    "mlp_scale": 2,
    "num_eigh": 5,
    "softcap": 0.6,  # scores reach ~2: the cap bites (checked below)
    "torch_dtype": "float32",
    "use_flash_fft": False,
    "dropout": 0.0,
    "bsz": 1,
}
VARIANTS = {
    "approx": {"n_layers": 3, "use_approx": True, "use_hankel_L": False, "use_attn": True},
    "full": {"n_layers": 2, "use_approx": False, "use_hankel_L": False, "use_attn": True},
    "hankel_l": {"n_layers": 2, "use_approx": False, "use_hankel_L": True, "use_attn": True},
    "stu_only": {"n_layers": 2, "use_approx": True, "use_hankel_L": True, "use_attn": False},
}
EPS = flashstu.TORCH_RMSNORM_EPS
# float32 logits against float64: each of <= 3 blocks rounds its norm, matmuls, FFT convolution
# (or softmax) and residual sum once each at ~eps relative (~10 roundings per block, 3 blocks),
# with our filters stored in float32 like the checkpoint's: ~30 eps of the logits' scale
BUDGET = 30 * np.finfo(np.float32).eps
forward = nnx.jit(lambda model, tokens: model(tokens))


def flash_state(config: dict, seed: int = 0, bias: bool = False) -> dict[str, np.ndarray]:
    """A FlashSTU state dict of random arrays for ``config``: torch layouts (Linear weights
    ``[out, in]``), ``phi`` as flash-stu-2 stores it (ascending order, arbitrary signs)."""
    rng = np.random.default_rng(seed)
    d, K, L, V = config["n_embd"], config["num_eigh"], config["seq_len"], config["vocab_size"]
    m = d * config["mlp_scale"]

    def w(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)

    state = {"tok_emb.weight": w(V, d, scale=3.0), "norm.weight": 1 + w(d, scale=0.3)}
    phi = flashstu.flashstu_filters(L, K, config["use_hankel_L"])
    state["phi"] = (phi * rng.choice([-1.0, 1.0], K)).astype(np.float32)
    for i in range(config["n_layers"]):
        p = f"layers.{i}"
        attn = config["use_attn"] and i % 2 == 1
        if attn:
            state[f"{p}.attn_norm.weight"] = 1 + w(d, scale=0.3)
            state[f"{p}.attn.c_attn.weight"] = w(3 * d, d, scale=3.0)
            state[f"{p}.attn.c_proj.weight"] = w(d, d)
            if bias:
                state[f"{p}.attn.c_attn.bias"] = w(3 * d, scale=0.3)
                state[f"{p}.attn.c_proj.bias"] = w(d, scale=0.3)
        else:
            state[f"{p}.stu_norm.weight"] = 1 + w(d, scale=0.3)
            if config["use_approx"]:
                state[f"{p}.stu.M_inputs"] = w(d, d)
                state[f"{p}.stu.M_filters"] = w(K, d)
            else:
                state[f"{p}.stu.M_phi_plus"] = w(K, d, d)
                if not config["use_hankel_L"]:
                    state[f"{p}.stu.M_phi_minus"] = w(K, d, d)
        state[f"{p}.mlp_norm.weight"] = 1 + w(d, scale=0.3)
        for name, shape in (("gate", (m, d)), ("up", (m, d)), ("down", (d, m))):
            state[f"{p}.mlp.{name}_proj.weight"] = w(*shape)
            if bias:
                state[f"{p}.mlp.{name}_proj.bias"] = w(shape[0], scale=0.3)
    if bias:
        state["lm_head.bias"] = w(V, scale=0.3)
    return state


def write(tmp_path, config: dict, state: dict) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


# ---- the float64 reference, from the semantics in issue 17 -----------------------------------


def rms(x, weight):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * weight


def causal_conv(u, kernel):
    """``y[t, c] = sum_{s <= t} kernel[t - s, c] u[s, c]``: u [L, C], kernel [L, C]."""
    L = u.shape[0]
    return np.stack([np.sum(kernel[t::-1] * u[: t + 1], axis=0) for t in range(L)])


def stu_ref(h, state, p, config, phi):
    L = h.shape[0]
    sgn = (-1.0) ** np.arange(L)[:, None]
    if config["use_approx"]:
        xp, kernel = h @ state[f"{p}.M_inputs"], phi @ state[f"{p}.M_filters"]
        plus = causal_conv(xp, kernel)
        minus = sgn * causal_conv(sgn * xp, kernel)
    else:
        K = phi.shape[1]
        # U[t, k, i] = sum_s phi[t - s, k] h[s, i]
        U = np.stack(
            [causal_conv(h, np.repeat(phi[:, k : k + 1], h.shape[1], 1)) for k in range(K)], 1
        )
        Um = sgn[:, :, None] * np.stack(
            [causal_conv(sgn * h, np.repeat(phi[:, k : k + 1], h.shape[1], 1)) for k in range(K)], 1
        )
        plus = np.einsum("tki,kio->to", U, state[f"{p}.M_phi_plus"])
        minus = (
            None
            if config["use_hankel_L"]
            else np.einsum("tki,kio->to", Um, state[f"{p}.M_phi_minus"])
        )
    return plus if config["use_hankel_L"] else plus + minus


def attn_ref(h, state, p, config, caps):
    L, d = h.shape
    H = config["n_heads"]
    hd = d // H
    qkv = h @ state[f"{p}.c_attn.weight"].T + state.get(f"{p}.c_attn.bias", 0.0)
    q, k, v = (a.reshape(L, H, hd) for a in np.split(qkv, 3, axis=-1))
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    caps.append(np.abs(s).max())
    c = config["softcap"]
    s = c * np.tanh(s / c)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    s = s - alibi_slopes(H)[:, None, None] * (i - j)
    visible = (j <= i) & (j >= i - config["window_size"])
    s = np.where(visible, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", w, v).reshape(L, d)
    return out @ state[f"{p}.c_proj.weight"].T + state.get(f"{p}.c_proj.bias", 0.0)


def mlp_ref(h, state, p):
    def lin(name, x):
        return x @ state[f"{p}.{name}.weight"].T + state.get(f"{p}.{name}.bias", 0.0)

    g = lin("gate_proj", h)
    gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    return lin("down_proj", gelu * lin("up_proj", h))


def flash_forward(config, state, tokens, caps):
    """float64 logits [L, V] of one sequence."""
    st = {k: v.astype(np.float64) for k, v in state.items()}
    # full mode convolves with the filters it computes itself, approx mode with phi
    phi = (
        st["phi"]
        if config["use_approx"]
        else flashstu.flashstu_filters(
            config["seq_len"], config["num_eigh"], config["use_hankel_L"]
        )
    )
    x = st["tok_emb.weight"][tokens]
    for i in range(config["n_layers"]):
        p = f"layers.{i}"
        if config["use_attn"] and i % 2 == 1:
            x = x + attn_ref(rms(x, st[f"{p}.attn_norm.weight"]), st, f"{p}.attn", config, caps)
        else:
            x = x + stu_ref(rms(x, st[f"{p}.stu_norm.weight"]), st, f"{p}.stu", config, phi)
        x = x + mlp_ref(rms(x, st[f"{p}.mlp_norm.weight"]), st, f"{p}.mlp")
    return rms(x, st["norm.weight"]) @ st["tok_emb.weight"].T + st.get("lm_head.bias", 0.0)


TOKENS = np.random.default_rng(7).integers(0, 23, 16)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_load_maps_every_key_and_matches_the_float64_reference(tmp_path, variant):
    config = {**BASE, **VARIANTS[variant], "bias": variant == "full"}
    state = flash_state(config, bias=config["bias"])
    model, report = flashstu.read(write(tmp_path, config, state))
    mapped = {key for key, _ in report.mapped}
    assert mapped | {"phi"} == set(state), "every key but phi maps to a variable"
    caps = []
    want = flash_forward(config, state, TOKENS, caps)
    got = np.asarray(forward(model, jnp.asarray(TOKENS[None])))[0]
    if config["use_attn"]:
        assert max(caps) > 2 * config["softcap"], "the softcap must bite"
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=BUDGET * scale)
    # our filters replaced the checkpoint's, float32 roundings of the same vectors: at most half
    # an ulp of the largest entry (eps / 2) apart, plus eigh's ~1e-13
    assert (
        report.alignment.diffs.max() < np.finfo(np.float32).eps and not report.differing_filters()
    )


def test_keep_phi_keeps_the_checkpoints_filters(tmp_path):
    config = {**BASE, **VARIANTS["approx"]}
    state = flash_state(config)
    kept, report = flashstu.read(write(tmp_path, config, state), keep_phi=True)
    assert report.kept_phi and kept.config.stu_filters == "loaded"
    np.testing.assert_array_equal(np.asarray(kept.blocks[0].mixer.filters[...]), state["phi"])
    want = flash_forward(config, state, TOKENS, [])
    got = np.asarray(forward(kept, jnp.asarray(TOKENS[None])))[0]
    np.testing.assert_allclose(got, want, atol=BUDGET * np.abs(want).max())


@pytest.mark.parametrize("variant", ["approx", "full"])
def test_save_then_load_is_the_identity(tmp_path, variant):
    config = {**BASE, **VARIANTS[variant], "bias": True}
    model = flashstu.load(write(tmp_path / "a", config, flash_state(config, bias=True)))
    flashstu.save(model, tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert {k: saved[k] for k in config} == {**config, "softcap": 0.6}
    again = flashstu.load(tmp_path / "b")
    pairs = zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again)), strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrapper_prefixes_and_a_file_path_load(tmp_path):
    config = {**BASE, **VARIANTS["stu_only"]}
    state = flash_state(config)
    prefixed = {f"_orig_mod.module.{k}": v for k, v in state.items()}
    write(tmp_path, config, prefixed)
    model = flashstu.load(tmp_path / "model.safetensors")
    want = flash_forward(config, state, TOKENS, [])
    got = np.asarray(forward(model, jnp.asarray(TOKENS[None])))[0]
    np.testing.assert_allclose(got, want, atol=BUDGET * np.abs(want).max())


def _error(tmp_path, config, state) -> str:
    with pytest.raises(ValueError) as err:
        flashstu.load(write(tmp_path, config, state))
    return str(err.value)


def test_bad_files_say_what_is_wrong(tmp_path, capsys):
    config = {**BASE, **VARIANTS["stu_only"]}
    state = flash_state(config)
    missing = {k: v for k, v in state.items() if k != "layers.1.stu.M_inputs"}
    assert "missing keys ['layers.1.stu.M_inputs']" in _error(tmp_path / "1", config, missing)
    extra = {**state, "layers.0.stu.M_phi_plus": state["layers.0.stu.M_inputs"]}
    assert "unknown keys ['layers.0.stu.M_phi_plus']" in _error(tmp_path / "2", config, extra)
    wrong = {**state, "layers.0.stu.M_filters": state["layers.0.stu.M_inputs"]}
    assert "layers.0.stu.M_filters has shape (12, 12)" in _error(tmp_path / "3", config, wrong)
    sandwich = {**config, "stu_enable_mlp_sandwich": True}
    assert "stu_enable_mlp_sandwich" in _error(tmp_path / "4", sandwich, state)
    assert "tiling" in _error(tmp_path / "5", {**config, "d_in_tile": 4}, state)
    untied = {**state, "lm_head.weight": state["tok_emb.weight"] + 1}
    assert "lm_head.weight differs" in _error(tmp_path / "6", config, untied)
    noise = {**state, "phi": np.random.default_rng(0).standard_normal((16, 5), np.float32)}
    assert "keep_phi=True" in _error(tmp_path / "7", config, noise)
    square = {**state, "phi": noise["phi"][:5]}  # [num_eigh, num_eigh]: arguments swapped
    assert "seq_len and num_eigh swapped" in _error(tmp_path / "10", config, square)
    # the run's task (bytes: 257 ids) does not fit a vocabulary of 23
    source = write(tmp_path / "9", config, state)
    out = str(tmp_path / "9" / "out")
    assert cli.main(["convert", source, out, "--set", "task.seq_len=16"]) == 2
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        flashstu.load(tmp_path / "8")
    (tmp_path / "8" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        flashstu.load(tmp_path / "8")
    assert "has 257 ids, more than the model's vocabulary of 23" in capsys.readouterr().err


def test_a_bfloat16_checkpoint_loads_and_reports_its_filters(tmp_path):
    config = {**BASE, **VARIANTS["stu_only"], "torch_dtype": "bfloat16"}
    state = {k: v.astype(ml_dtypes.bfloat16) for k, v in flash_state(config).items()}
    model, report = flashstu.read(write(tmp_path, config, state))
    assert model.config.dtype == "bfloat16"
    np.testing.assert_array_equal(
        np.asarray(model.embed.embedding[...]), state["tok_emb.weight"].astype(np.float32)
    )
    # a bf16 phi differs from ours by its rounding: at most 2^-9 of the largest entry; by
    # default the checkpoint's own filters are then kept, so the function is flash-stu-2's
    assert 0 < report.alignment.diffs.max() <= 2.0**-9 and report.differing_filters()
    assert report.kept_phi and model.config.stu_filters == "loaded"
    ours, report = flashstu.read(tmp_path, keep_phi=False)
    assert ours.config.stu_filters == "computed" and "--keep-phi" in "\n".join(report.lines())


def test_a_bfloat16_phi_in_a_float32_checkpoint_keeps_flash_stus_logits(tmp_path):
    # flash-stu-2 builds phi in bf16 whatever the model dtype: our filters would move the logits
    # by ~2.5e-3 of their scale (measured), the kept phi by float32 rounding only (BUDGET)
    config = {**BASE, **VARIANTS["approx"]}
    state = flash_state(config)
    state["phi"] = state["phi"].astype(ml_dtypes.bfloat16).astype(np.float32)
    model, report = flashstu.read(write(tmp_path, config, state))
    assert report.kept_phi
    want = flash_forward(config, state, TOKENS, [])
    got = np.asarray(forward(model, jnp.asarray(TOKENS[None])))[0]
    np.testing.assert_allclose(got, want, atol=BUDGET * np.abs(want).max())


def test_window_sizes_and_dtypes_of_config_json():
    assert flashstu.window_keys(1024, 8192) == 1025
    assert flashstu.window_keys([7, 0], 64) == 8
    assert flashstu.window_keys(-1, 64) == 64
    both = {**BASE, **VARIANTS["approx"]}
    del both["torch_dtype"]
    assert flashstu.model_config({**both, "dtype": "bfloat16"}).dtype == "bfloat16"
    assert flashstu.model_config({**both, "torch_dtype": "float32"}).dtype == "float32"
    with pytest.raises(ValueError, match="window_size"):
        flashstu.window_keys([1, 2, 3], 64)


@pytest.mark.parametrize("chunk", [None, 4])
def test_alibi_softcap_prefill_and_step_match_the_parallel_forward(tmp_path, chunk):
    """A ragged batch (row 1 left-padded by 3) decodes what each row's own forward gives, with
    the prompt in one piece or in chunks of 4 continuing from the cache: ALiBi is relative, so
    the padding shifts nothing; windows of 5 keys < the 14 positions."""
    config = {**BASE, **VARIANTS["approx"], "n_layers": 2}  # an STU block, an attention block
    model = flashstu.load(write(tmp_path, config, flash_state(config)))
    rows = [TOKENS[:14], np.random.default_rng(8).integers(0, 23, 11)]
    prompts = [row[: len(row) - 5].tolist() for row in rows]
    logits, cache = prefill(model, prompts, DecodeOptions(prefill_chunk=chunk))
    step = nnx.jit(lambda m, c, t: m.step(c, t))
    got = [logits]
    for i in range(4):
        cache, out = step(model, cache, jnp.asarray([row[len(row) - 5 + i] for row in rows]))
        got.append(out)
    got = np.stack([np.asarray(g) for g in got], axis=1)  # [B, 5, V]: positions -6 .. -2
    for b, row in enumerate(rows):
        want = np.asarray(forward(model, jnp.asarray(row[None])))[0, -6:-1]
        np.testing.assert_allclose(got[b], want, atol=BUDGET * np.abs(want).max())


def test_alibi_slopes_are_flash_stus():
    # 2^(-8/n) geometric for n = 2^m heads; else the 2 heads' slopes, then every other slope of
    # 4 heads (2^-2, 2^-6, ...) for the third; all times 0.25
    np.testing.assert_array_equal(alibi_slopes(8), 0.25 * 2.0 ** -np.arange(1.0, 9.0))
    np.testing.assert_array_equal(alibi_slopes(3), 0.25 * np.array([2**-4, 2**-8, 2**-2]))


def test_cli_convert_then_export_round_trips(tmp_path, capsys):
    config = {**BASE, **VARIANTS["stu_only"], "vocab_size": 300}  # byte tokenizer ids fit
    state = flash_state(config)
    source = write(tmp_path / "src", config, state)
    args = ["--set", "task.seq_len=16"]
    assert cli.main(["convert", source, str(tmp_path / "ckpt"), *args]) == 0
    printed = capsys.readouterr().out
    assert "layers.1.stu.M_filters -> blocks.1.mixer.M_filt_plus" in printed
    assert "spectral-jax train lm_bytes_small --checkpoint-dir" in printed
    assert cli.main(["export", str(tmp_path / "ckpt"), str(tmp_path / "back")]) == 0
    assert "tok_emb.weight" in capsys.readouterr().out
    want = np.asarray(forward(flashstu.load(source), jnp.asarray(TOKENS[None])))
    got = np.asarray(forward(flashstu.load(tmp_path / "back"), jnp.asarray(TOKENS[None])))
    np.testing.assert_array_equal(got, want)
    # bad input: one line, rc 2
    assert cli.main(["convert", str(tmp_path / "nothing.safetensors"), str(tmp_path / "x")]) == 2
    assert "nothing.safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_a_converted_checkpoint_fine_tunes_generates_and_distills(tmp_path, capsys):
    config = {**BASE, **VARIANTS["approx"], "vocab_size": 300}
    source = write(tmp_path / "src", config, flash_state(config))
    ckpt = str(tmp_path / "ckpt")
    run = ["--set", "task.seq_len=16", "--set", "steps=2", "--set", "global_batch=2"]
    assert cli.main(["convert", source, ckpt, *run]) == 0
    train = capsys.readouterr().out.strip().splitlines()[-1].split()[1:]  # the printed command
    assert cli.main(train) == 0
    assert "resumed from step 0" in capsys.readouterr().out
    assert cli.main(["generate", ckpt, "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert cli.main(["distill", ckpt, str(tmp_path / "lds"), "--num-states", "16"]) == 0
    report = capsys.readouterr().out
    assert "distilled vs STU: relative error" in report
    # the distilled model keeps the MLP and attention choices
    distilled, _ = load_for_inference(str(tmp_path / "lds"))
    assert distilled.blocks[1].mixer.config.positions == "alibi"
    assert distilled.blocks[0].mlp.activation == "geglu"
    assert type(distilled.blocks[0].mixer).__name__ == "LDSLayer"
