"""Decode tokens/s against batch: our distilled models beside recurrentgemma's Griffin, every row
against the machine's in-scan matmul limit.

Models (4 layers, d_model 128, gated-MLP width 344, vocab 256, float32, random weights):

* ``distilled_stu``: the headline STU-only tensordot model (K 24), distilled by
  ``decode_plan(model, "lds")``, i.e. whatever the default ``distill`` policy gives;
* ``distilled_hybrid``: S A S A (our attention: window 128, 4 heads), distilled likewise;
* ``griffin_recurrent``: Griffin (:mod:`griffin_peer`), 4 RG-LRU blocks (width 128, 4 heads);
* ``griffin_rrar``: Griffin's R R A R pattern, local attention window 1024.

For each batch (1, 16, 64, 256) every model prefills the same random prompt (1024 tokens), then
decodes 2048 greedy tokens in one compiled ``lax.scan``; tokens/s counts every row (median of
``--repeats`` runs after a compiling one). A model that cannot run a batch (out of memory, say)
gets a row with ``skipped`` and its reason. Griffin's rows are skipped with one line when
recurrentgemma is absent (``make bench-peers`` installs it).

Matmul limit: before the models, at each batch, a ``lax.scan`` of ``--new`` steps of the models'
matmuls (per step, 4 x ``[B, D] x [D, D]``, ``[B, D] x [D, 2F]``, ``[B, F] x [F, D]``, then the
head ``[B, D] x [D, V]``, an argmax and an embedding lookup feeding the next step) gives the rate
``R(B)`` FLOP/s. Each row's ``limit_tokens_per_second = R(B) / flops_per_token`` and
``of_limit = tokens_per_second / limit``.

FLOPs per token (a multiply-add is 2; norms, activations, rotary embeddings and softmax not
counted; ``D`` width, ``F`` MLP width, ``V`` vocab): every model ``2DV`` (head) plus ``6DF`` per
block (gated MLP); a distilled tensordot STU layer ``2D^2`` (``M_in``) ``+ 4 s`` for its ``s``
states per sequence, read from its cache (update ``x = a x + u`` and readout ``y += w x``), plus
``2(k_u + k_y)D^2`` for AR terms; our attention layer ``8D^2 + 4DW`` (projections; scores and
values over the ``W`` ring-buffer keys). Griffin's blocks: :meth:`GriffinShape.flops_per_token`.
State bytes per sequence: the bytes of the decode cache pytree over the batch.

JSON: ``{"rows": [{"model", "batch", "tokens_per_second", "seconds", "prefill_seconds",
"compile_seconds", "cache_bytes", "flops_per_token", "matmul_flops_per_second",
"limit_tokens_per_second", "of_limit"} or {"model", "batch", "skipped"}], "matmul": [{"batch",
"flops_per_second"}], "ratios": {...}, "meta": {...}}``, rewritten after every row
(``meta.partial`` until the run ends); the plot (``--plot``, default beside the JSON) shows
tokens/s and the limits against batch (ratios and plot: :mod:`decode_batch_report`).
``--quick``: tiny models (d_model 16), batches 1 and 2, a 128-token prompt (the default
bank's 120 states need that length), 8 new tokens (checks the path; the test runs it).

Usage: python experiments/bench_decode.py batch [--quick] [--json PATH] [--plot PATH]
       [--batches B ...] [--new N] [--prompt L] [--repeats R] [--models NAME ...]
   or: python experiments/bench_decode_batch.py [the same flags]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import griffin_peer
import jax
import jax.numpy as jnp
from bench_decode_model import MODELS
from decode_batch_report import plot, ratios, summarize
from decode_bench_common import load, time_decode
from flax import nnx
from timing import median_seconds

from spectral_jax.atomic_files import write_json_atomic
from spectral_jax.decode import generate as gen
from spectral_jax.decode.strategy import decode_plan
from spectral_jax.nn.model import ModelConfig, SpectralModel

OURS = {"distilled_stu": "stu_tensordot", "distilled_hybrid": "hybrid_tensordot"}  # MODELS key
GRIFFINS = {"griffin_recurrent": "RRRR", "griffin_rrar": "RRAR"}
FULL = dict(d_model=128, num_layers=4, num_filters=24, vocab=256, heads=4, window=128,
            griffin_window=1024, prompt=1024, new=2048, batches=[1, 16, 64, 256])  # fmt: skip
QUICK = dict(d_model=16, num_layers=4, num_filters=8, vocab=256, heads=4, window=8,
             griffin_window=8, prompt=128, new=8, batches=[1, 2])  # fmt: skip


def distilled_flops_per_token(config: ModelConfig, cache) -> float:
    """Decode FLOPs per token of a distilled tensordot model (module docstring), the states per
    sequence of each layer read from its decode ``cache`` (a ``ModelCache``, or its shapes): every
    leaf of its plain-arithmetic state, batch first (one array, or one per channel group)."""
    D, F = config.d_model, config.hidden_dim
    total = 2 * D * config.vocab_size
    for kind, layer in zip(config.layer_kinds, cache.layers, strict=True):
        total += 6 * D * F
        if kind == "S":
            states = sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(layer.state))
            total += 2 * D * D + 4 * states + 2 * (config.k_u + config.k_y) * D * D
        else:
            total += 8 * D * D + 4 * D * layer.k.shape[1]
    return float(total)


def matmul_rate(batch: int, steps: int, size: dict, hidden: int) -> float:
    """FLOP/s of ``steps`` steps of the models' matmuls at ``batch`` rows in one ``lax.scan``
    (module docstring; weights orthogonal, so the chain neither grows nor vanishes)."""
    D, F, V, layers = size["d_model"], hidden, size["vocab"], size["num_layers"]
    keys = iter(jax.random.split(jax.random.key(batch), 4 * layers + 2))

    def orthogonal(rows, cols):
        q, _ = jnp.linalg.qr(jax.random.normal(next(keys), (max(rows, cols), min(rows, cols))))
        return q if rows >= cols else q.T

    weights = [(orthogonal(D, D), orthogonal(D, 2 * F), orthogonal(F, D)) for _ in range(layers)]
    head, table = orthogonal(D, V), jax.random.normal(next(keys), (V, D)) / D**0.5

    @jax.jit
    def run(weights, head, table, x):
        def step(x, _):
            for mix, up, down in weights:
                h = (x @ mix) @ up
                x = x + h[:, :F] @ down
                x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True))
            token = jnp.argmax(x @ head, axis=-1)
            return x + table[token], token

        return jax.lax.scan(step, x, None, length=steps)[1]

    x = jax.random.normal(next(keys), (batch, D))
    seconds = median_seconds(run, weights, head, table, x, repeats=3)
    return batch * steps * (layers * (2 * D * D + 6 * D * F) + 2 * D * V) / seconds


def our_config(size: dict, name: str) -> ModelConfig:
    """The config of our model ``name`` (a key of :data:`OURS`) at ``size`` (FULL or QUICK);
    random weights and ``decode_plan(model, "lds")`` make the benchmarked model."""
    pattern, projection = MODELS[OURS[name]]
    return ModelConfig(
        d_model=size["d_model"], num_layers=size["num_layers"],
        max_len=size["prompt"] + size["new"], vocab_size=size["vocab"],
        num_filters=size["num_filters"], layer_pattern=pattern, stu_projection=projection,
        num_heads=size["heads"], window=size["window"],
    )  # fmt: skip


def build(size: dict, names: list[str]):
    """``({name: (prefill, decode, FLOPs per token)}`` for the models of ``names`` that can run
    here, ``{name: reason}`` for those that cannot, the MLP width)``."""
    models, absent = {}, {}
    one_row = jnp.zeros((1, size["prompt"]), jnp.int32)
    for name in OURS:
        config = our_config(size, name)
        hidden = config.hidden_dim  # the same for both of ours (their default SwiGLU width)
        if name not in names:
            continue
        plan = decode_plan(SpectralModel(config, rngs=nnx.Rngs(0)), "lds")
        prefill = lambda p, plan=plan: gen.prefill(plan.model, p, plan.options)  # noqa: E731
        cache = jax.eval_shape(prefill, one_row)[1]  # shapes only: nothing compiles
        models[name] = (
            prefill,
            lambda cache, logits, n, plan=plan: gen.decode(plan.model, cache, logits, n),
            distilled_flops_per_token(config, cache),
        )
    reason = griffin_peer.missing()
    for name, pattern in GRIFFINS.items():
        if name not in names:
            continue
        if reason:
            absent[name] = reason
            continue
        shape = griffin_peer.GriffinShape(
            pattern, size["d_model"], hidden, size["heads"], size["vocab"], size["griffin_window"]
        )
        peer = griffin_peer.GriffinPeer(shape)
        models[name] = (peer.prefill, peer.decode, shape.flops_per_token())
    return models, absent, hidden


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, run the sweep, write the JSON and the plot; returns the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the path)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--plot", type=Path, help="PNG of tokens/s (default: beside --json)")
    parser.add_argument("--batches", nargs="+", type=int, help="default 1 16 64 256")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 1024)")
    parser.add_argument("--new", type=int, help="tokens to decode (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode runs per row")
    parser.add_argument("--models", nargs="+", choices=[*OURS, *GRIFFINS],
                        default=[*OURS, *GRIFFINS])  # fmt: skip
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    for flag in ("batches", "prompt", "new"):
        if getattr(args, flag) is not None:
            size[flag] = getattr(args, flag)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or ''}")
    print(f"load before: {load()}")
    start = time.perf_counter()
    models, absent, hidden = build(size, args.models)
    for name, reason in absent.items():
        print(f"  {name}: skipped, {reason}")
    doc: dict = {"rows": [], "matmul": [], "ratios": {}, "meta": {
        "quick": args.quick, "size": size, "mlp_width": hidden, "repeats": args.repeats,
        "absent": absent, "build_seconds": time.perf_counter() - start,
    }}  # fmt: skip

    def write(final: bool = False) -> None:
        doc["ratios"] = ratios(doc["rows"])
        doc["meta"]["partial"] = not final
        if args.json:
            write_json_atomic(args.json, doc)

    prompt_key = jax.random.key(size["prompt"])
    for batch in size["batches"]:
        rate = matmul_rate(batch, size["new"], size, hidden)
        doc["matmul"].append({"batch": batch, "flops_per_second": rate})
        print(f"B={batch:<4} matmul in a scan: {rate / 1e9:8.2f} GFLOP/s")
        prompt = jax.random.randint(prompt_key, (batch, size["prompt"]), 0, size["vocab"])
        for name, (prefill, decode, per_token) in models.items():
            tag = f"  {name:>18} B={batch:<4}"
            try:
                timing = time_decode(prefill, decode, prompt, size["new"], args.repeats)
            except jax.errors.JaxRuntimeError as err:  # e.g. out of memory
                doc["rows"].append({"model": name, "batch": batch,
                                    "skipped": str(err).splitlines()[0]})  # fmt: skip
                print(f"{tag} skipped: {doc['rows'][-1]['skipped']}")
                write()
                continue
            limit = rate / per_token
            row = {"model": name, "batch": batch, **timing, "flops_per_token": per_token,
                   "matmul_flops_per_second": rate, "limit_tokens_per_second": limit,
                   "of_limit": timing["tokens_per_second"] / limit}  # fmt: skip
            doc["rows"].append(row)
            write()
            state, compile_s = row["cache_bytes"], row["compile_seconds"]
            print(f"{tag} {row['tokens_per_second']:10.0f} tok/s  limit {limit:10.0f} "
                  f"({row['of_limit']:5.2f} of it)  {per_token / 1e6:.3f} MFLOP/token  "
                  f"state {state:,} B/seq  compile {compile_s:.1f} s")  # fmt: skip
    doc["meta"].update(jax=jax.__version__, device=str(jax.devices()[0]), load_after=load())
    print(f"load after: {doc['meta']['load_after']}")
    write(final=True)
    summarize(doc["ratios"])
    if args.json:
        print(f"wrote {args.json}")
        png = args.plot or args.json.with_suffix(".png")
        plot(doc["rows"], png)
        print(f"wrote {png}")
    return doc


if __name__ == "__main__":
    main()
