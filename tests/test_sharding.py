"""Mesh, FSDP rules, batch placement, and the sharded train step vs one device.

The 8-device test runs in a subprocess because XLA_FLAGS must be set before JAX is
imported; this file doubles as that subprocess's script (``python test_sharding.py``).
"""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from spectral_jax.train import sharding as shd

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_rule_table_maps_logical_axes_to_the_mesh():
    spec = lambda names, shape, fsdp=2: shd.logical_partition_spec(  # noqa: E731
        names, shape, {"data": 4, "fsdp": fsdp}
    )
    assert spec(("embed", "mlp"), (8, 16)) == P(None, "fsdp")  # mlp before embed
    assert spec(("mlp", "embed"), (16, 8)) == P("fsdp")
    assert spec(("vocab", "embed"), (256, 8)) == P("fsdp")
    assert spec(("vocab", "embed"), (257, 8)) == P(None, "fsdp")  # vocab does not divide
    assert spec(("filters", "embed", "embed"), (4, 8, 8)) == P(None, "fsdp")  # one axis only
    assert spec(("time", "filters"), (4096, 24)) == P()  # the filters: never along time
    assert spec(("embed", "mlp"), (7, 5)) == P()  # nothing divides: replicate
    assert spec(("norm",), (8,)) == P()
    assert spec((), ()) == P()
    assert spec(("embed", "mlp"), (8, 16), fsdp=1) == P()
    with pytest.raises(ValueError, match=r"\['embd'\] are not in the rule table"):
        spec(("embd", "mlp"), (8, 16))
    with pytest.raises(ValueError, match="do not match the array shape"):
        spec(("embed",), (8, 16))


def test_every_model_array_is_named_and_the_filters_stay_whole():
    from flax import nnx

    from spectral_jax.nn.model import ModelConfig, SpectralModel

    config = ModelConfig(
        d_model=16, num_layers=2, max_len=32, vocab_size=256, num_filters=4,
        layer_pattern="SA", window=8, num_heads=2, d_hidden=32, k_u=2, k_y=1,
    )  # fmt: skip
    state = nnx.state(nnx.eval_shape(lambda: SpectralModel(config, rngs=nnx.Rngs(0))))
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(variables) > 10
    for variable in variables:
        names = shd.logical_axes(variable)
        assert names is not None and len(names) == variable.ndim, variable
    mesh = AbstractMesh((1, 2), ("data", "fsdp"))
    shardings = shd.state_shardings(state, mesh)
    assert shardings["blocks"][0]["mixer"]["filters"].get_value().spec == P()  # [max_len, K]
    assert shardings["blocks"][0]["mlp"]["w_down"].get_value().spec == P("fsdp")
    assert shardings["embed"]["embedding"].get_value().spec == P("fsdp")
    assert shardings["blocks"][1]["mixer"]["qkv"]["kernel"].get_value().spec == P(None, "fsdp")


def test_a_parameter_that_cannot_be_sharded_is_replicated_with_a_warning():
    from flax import nnx

    state = nnx.State(
        {"w": nnx.Param(jax.ShapeDtypeStruct((3, 5), np.float32), logical_axes=("embed", "mlp"))}
    )
    with pytest.warns(UserWarning, match=r"replicated .*\['w'\] \(3, 5\)"):
        shardings = shd.state_shardings(state, AbstractMesh((1, 2), ("data", "fsdp")))
    assert shardings["w"].get_value().spec == P()


def test_check_global_batch_names_the_mesh_axes():
    mesh = AbstractMesh((4, 2), ("data", "fsdp"))
    shd.check_global_batch(16, mesh)
    with pytest.raises(ValueError, match=r"global_batch=6 .* 8 \(mesh data=4 x fsdp=2\)"):
        shd.check_global_batch(6, mesh)
    with pytest.raises(ValueError, match="global_batch=0"):
        shd.check_global_batch(0, mesh)


def test_mesh_and_rows_on_this_process():
    mesh = shd.make_mesh()
    assert mesh.axis_names == ("data", "fsdp")
    assert mesh.shape["data"] * mesh.shape["fsdp"] == jax.device_count()
    np.testing.assert_array_equal(
        shd.process_rows(4 * jax.device_count(), mesh), np.arange(4 * jax.device_count())
    )
    batch = shd.place_batch({"x": np.arange(12.0).reshape(4, 3)}, mesh, 4)
    assert batch["x"].shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(12.0).reshape(4, 3))
    with pytest.raises(ValueError, match="must supply 4 rows"):
        shd.place_batch({"x": np.zeros((3, 3))}, mesh, 4)


def test_bad_mesh_and_distributed_configs():
    with pytest.raises(ValueError, match="fsdp"):
        shd.MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="data"):
        shd.MeshConfig(data=0)
    with pytest.raises(ValueError, match="does not match the 1 devices"):
        shd.make_mesh(shd.MeshConfig(data=4, fsdp=2), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="given together"):
        shd.DistributedConfig(coordinator_address="localhost:1234")
    with pytest.raises(ValueError, match="process_id"):
        shd.DistributedConfig("localhost:1234", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="auto=True"):
        shd.DistributedConfig("localhost:1234", 2, 0, auto=True)
    assert not shd.DistributedConfig().enabled
    shd.initialize_distributed(shd.DistributedConfig())  # single process: a no-op
    assert jax.process_count() == 1


# ---------------------------------------------------------------------------- 8 devices

LEARNING_RATE = 1e-2
# AdamW moves a parameter by lr * m / (sqrt(v) + eps) per step, whose derivative in the
# gradient is at most lr / eps (reached where |g| ~ eps). Float32 gradient sums over a
# few hundred positions differ between layouts by e <~ 1e-8, so one step's parameters
# agree to lr * e / eps = 1e-6 with eps = 1e-4, plus a few ulps of the parameter.
ADAM_EPS = 1e-4


def _one_step_worker(out_path: str, data: int, fsdp: int, global_batch: int) -> None:
    """One train step of a tiny hybrid SpectralModel; dump loss, params, shardings."""
    from flax import nnx

    from spectral_jax.data.lm_tasks import ByteCorpusLM
    from spectral_jax.nn.model import ModelConfig
    from spectral_jax.train import MeshConfig, OptimConfig, TrainConfig, train

    model = ModelConfig(
        d_model=16, num_layers=2, max_len=32, vocab_size=256, num_filters=4,
        layer_pattern="SA", window=8, num_heads=2, d_hidden=32,
    )  # fmt: skip
    config = TrainConfig(
        task=ByteCorpusLM(seq_len=32),
        model=model,
        optim=OptimConfig(
            learning_rate=LEARNING_RATE, warmup_steps=0, decay_steps=10, eps=ADAM_EPS
        ),
        steps=1,
        global_batch=global_batch,
        mesh=MeshConfig(data=data, fsdp=fsdp),
        eval_batches=0,
        log_every=1,
    )
    try:
        result = train(config)
    except ValueError as e:
        pathlib.Path(out_path).write_text(json.dumps({"error": str(e)}))
        return
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(result.model, nnx.Param))
    params = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
    specs = {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves}
    np.savez(out_path + ".npz", **params)
    record = {"loss": result.history[0]["loss"], "devices": jax.device_count(), "specs": specs}
    pathlib.Path(out_path).write_text(json.dumps(record))


def _launch(out_path, data, fsdp, devices, global_batch=8):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    args = [sys.executable, __file__, str(out_path), str(data), str(fsdp), str(global_batch)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()


def test_one_train_step_on_8_devices_equals_one_device(tmp_path):
    sharded_out, single_out = tmp_path / "sharded", tmp_path / "single"
    procs = [_launch(sharded_out, 4, 2, devices=8), _launch(single_out, 1, 1, devices=1)]
    for proc in procs:
        _finish(proc)
    sharded, single = (json.loads(p.read_text()) for p in (sharded_out, single_out))
    assert sharded["devices"] == 8 and single["devices"] == 1
    # FSDP really shards: the MLP matrices [16, 32] split their 32-wide axis over fsdp.
    w_up = "['blocks'][0]['mlp']['w_up'].value"
    assert sharded["specs"][w_up] == str(P(None, "fsdp"))
    assert single["specs"][w_up] == str(P())
    # The loss is a float32 mean over 8 x 32 positions, reduced in another order on 8
    # devices: a few ulps apart (float32 eps = 1.2e-7).
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-6)
    a, b = (dict(np.load(f"{out}.npz")) for out in (sharded_out, single_out))
    assert sorted(a) == sorted(b) and len(a) > 10
    # One AdamW step: lr * 1e-8 / ADAM_EPS = 1e-6 (see ADAM_EPS), plus 4 ulps.
    chex.assert_trees_all_close(a, b, rtol=4 * 2**-23, atol=LEARNING_RATE * 1e-8 / ADAM_EPS)


def test_batch_not_divisible_by_the_batch_axes_is_rejected(tmp_path):
    out = tmp_path / "bad"
    _finish(_launch(out, 4, 2, devices=8, global_batch=12))
    error = json.loads(out.read_text())["error"]
    assert "global_batch=12" in error and "mesh data=4 x fsdp=2" in error


if __name__ == "__main__":
    _one_step_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
