"""A run saved on 4 devices (fsdp=4) resumes on other meshes and loads on one device.

Each mesh size needs its own process (``XLA_FLAGS`` fixes the simulated CPU device count
before JAX is imported, and ``make_mesh`` spans every device), so this file doubles as the
workers' script (``python test_mesh_restore.py MODE OUT_DIR``): ``4`` runs the uninterrupted
reference, saving at step 2, and resumes a copy of that step on the same mesh; ``2`` resumes
copies with fsdp=2 and with data=2; ``1`` resumes one on one device and loads the reference's
final checkpoint for inference.

The float32 budget. Summing n terms in another order changes the sum by at most
``n * EPS32 * sum|terms|`` (each order is within ``(n - 1) * EPS32 / 2 * sum|terms|`` of the
exact sum). Parameters and optimizer state are restored bit for bit (the saved arrays are only
re-sliced onto the new mesh), so a layout changes only the sums it splits:

- the loss, a mean of ``N = B * L * d_out = 256`` squared errors (non-negative, so their
  ``sum|terms|`` is the loss itself): at most ``N * EPS32 * loss``;
- contractions over a sharded parameter axis, the longest ``n_c = K * d_model = 64``
  (``M_plus``/``M_minus`` ``[K, d_model, d_model]`` split along their input width): an output
  of scale ``Y`` moves by ``n_c * EPS32 * Y`` (``sum|terms|`` taken as the output's scale;
  ``Y``: the largest output on the probe input, N(0, 1) like the task's inputs),
  and the loss ``mean(r**2)`` by at most ``2 * sqrt(loss)`` times that;
- the gradient, a sum over ``n_g = B * L = 128`` positions of each parameter's contributions
  (plus the forward's ``n_c`` rounding carried through the backward pass): at most
  ``(n_g + n_c) * EPS32 * |g|`` in norm.

Step 3, the first resumed one, sees only the first two (``forward_budget``). Step 4 also sees
the step-3 update: clipping to ``grad_clip`` (a projection onto a ball) does not enlarge a
gradient difference, and AdamW's ``lr * m_hat / (sqrt(v_hat) + eps)`` moves by at most
``lr / eps`` per unit gradient when ``eps >= |g|``, which ``ADAM_EPS = 1 >= grad_clip`` makes
true, so ``|dtheta| <= LR / ADAM_EPS * |dg_3|`` and the loss moves by ``|g_4| * |dtheta|`` more.
``|g|`` are the logged (pre-clipping) gradient norms. With ``loss ~ 0.3``, ``Y ~ 1.3`` and
``|g| ~ 1.2 .. 1.6`` the budgets are ~2e-5 absolute (the update's share ~4e-7); the layouts
measured here differ by at most 6e-8, a few ulps (worst-case rounding bounds lie that far above
typical rounding). The outputs' budget ``n_c * EPS32 * Y`` is ~1e-5; measured 5e-7.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

EPS32 = float(np.finfo(np.float32).eps)

REPO = pathlib.Path(__file__).resolve().parents[1]
SAVE_STEP, STEPS, GLOBAL_BATCH, SEQ_LEN, D_MODEL = 2, 4, 8, 16, 16
LR, ADAM_EPS = 1e-2, 1.0
N_LOSS = GLOBAL_BATCH * SEQ_LEN * 2  # squared errors in the batch mean (d_out = 2)
N_CONTRACT = 4 * D_MODEL  # longest contraction over a sharded axis: K * d_model
N_GRAD = GLOBAL_BATCH * SEQ_LEN  # positions summed into each parameter's gradient
MESHES = {"4": {"fsdp4": (1, 4)}, "2": {"fsdp2": (1, 2), "data2": (2, 1)}, "1": {"one": (1, 1)}}


def _config(directory: pathlib.Path, data: int, fsdp: int):
    from spectral_jax.data.tasks import LDSRegression
    from spectral_jax.nn.model import ModelConfig
    from spectral_jax.train import CheckpointConfig, MeshConfig, OptimConfig, TrainConfig

    return TrainConfig(
        task=LDSRegression(seq_len=SEQ_LEN, d_input=2, d_output=2, state_dim=4),
        model=ModelConfig(
            d_model=D_MODEL,
            num_layers=1,
            max_len=SEQ_LEN,
            d_input=2,
            d_output=2,
            num_filters=4,
            d_hidden=32,
        ),
        optim=OptimConfig(learning_rate=LR, warmup_steps=0, decay_steps=10, eps=ADAM_EPS),
        steps=STEPS,
        global_batch=GLOBAL_BATCH,
        mesh=MeshConfig(data=data, fsdp=fsdp),
        checkpoint=CheckpointConfig(str(directory), save_every=SAVE_STEP, async_save=False),
        eval_batches=0,
        log_every=1,
    )


def _probe() -> np.ndarray:
    """The fixed inference input ``[B, L, d_in]``."""
    return np.random.default_rng(0).standard_normal((2, SEQ_LEN, 2)).astype(np.float32)


def _train_records(result) -> dict[str, list[float]]:
    """Step (a JSON key) -> [loss, grad_norm] of every train step of this invocation."""
    return {
        str(r["step"]): [r["loss"], r["grad_norm"]]
        for r in result.history
        if r.get("split") == "train"
    }


def _worker(mode: str, out: pathlib.Path) -> None:
    from flax import nnx

    from spectral_jax.train import load_for_inference, train

    record = {"devices": jax.device_count(), "runs": {}, "w_up": {}}
    reference = out.parent / "reference"
    if mode == "4":
        result = train(_config(reference, 1, 4))
        record["runs"]["reference"] = _train_records(result)
        record["outputs"] = np.asarray(result.model(_probe())).tolist()
    for name, (data, fsdp) in MESHES[mode].items():
        directory = out / name
        shutil.copytree(reference / str(SAVE_STEP), directory / str(SAVE_STEP))
        result = train(_config(directory, data, fsdp))
        record["runs"][name] = _train_records(result)
        w_up = nnx.state(result.model)["blocks"][0]["mlp"]["w_up"].get_value()
        record["w_up"][name] = [str(w_up.sharding.spec), len(w_up.sharding.device_set)]
    if mode == "1":
        model, meta = load_for_inference(str(reference))
        record["loaded_step"] = meta["step"]
        record["outputs"] = np.asarray(model(_probe())).tolist()
    (out / "record.json").write_text(json.dumps(record))


def _run(modes, tmp_path) -> dict[str, dict]:
    """Start one worker per mode (its device count) at once; their records by mode."""
    procs = {}
    for mode in modes:
        (tmp_path / mode).mkdir()
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={mode}"
        env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
        env["PYTHONPATH"] = str(REPO)
        args = [sys.executable, __file__, mode, str(tmp_path / mode)]
        procs[mode] = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    records = {}
    for mode, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()
        records[mode] = json.loads((tmp_path / mode / "record.json").read_text())
        assert records[mode]["devices"] == int(mode)
    return records


def forward_budget(loss: float, scale: float) -> float:
    """Loss change from the layout's forward sums: the batch mean and the sharded contractions
    (module docstring)."""
    return N_LOSS * EPS32 * loss + 2 * np.sqrt(loss) * N_CONTRACT * EPS32 * scale


def test_resume_on_2_and_1_devices_matches_the_4_device_run(tmp_path):
    records = _run(["4"], tmp_path)  # the reference writes the checkpoints the others copy
    records.update(_run(["2", "1"], tmp_path))
    runs = {name: run for r in records.values() for name, run in r["runs"].items()}
    reference = runs.pop("reference")
    assert sorted(reference) == [str(s) for s in range(1, STEPS + 1)]
    # Each resume really ran on its own mesh: w_up [d_model, d_hidden] splits d_hidden by fsdp.
    w_up = {name: spec for r in records.values() for name, spec in r["w_up"].items()}
    split, whole = str(P(None, "fsdp")), str(P())
    assert w_up == {
        "fsdp4": [split, 4],
        "fsdp2": [split, 2],
        "data2": [whole, 2],
        "one": [whole, 1],
    }
    # Same mesh: same programs on the same state and batches, bitwise equal.
    assert runs.pop("fsdp4") == {k: reference[k] for k in ("3", "4")}
    out4, out1 = (np.array(records[m]["outputs"]) for m in ("4", "1"))
    scale = float(np.abs(out4).max())
    (loss3, g3), (loss4, g4) = reference["3"], reference["4"]
    budget = {
        "3": forward_budget(loss3, scale),
        "4": forward_budget(loss4, scale) + g4 * LR / ADAM_EPS * (N_GRAD + N_CONTRACT) * EPS32 * g3,
    }
    for name, run in runs.items():
        assert sorted(run) == ["3", "4"], name
        for step, (loss, _) in run.items():
            assert abs(loss - reference[step][0]) <= budget[step], (name, step, budget)
    # One device loads the 4-device run's last checkpoint for inference: the same parameter
    # bits, so its outputs differ from the 4-device model's only by the sharded contractions.
    assert records["1"]["loaded_step"] == STEPS
    np.testing.assert_allclose(out1, out4, rtol=0, atol=N_CONTRACT * EPS32 * scale)


if __name__ == "__main__":
    _worker(sys.argv[1], pathlib.Path(sys.argv[2]))
