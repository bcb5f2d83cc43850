"""Bytes moved per decode step against the state size and the machine's copy bandwidth.

Targets: the distilled headline model of ``bench_decode_batch.py`` (its ``distilled_stu``: the
same config, random weights and ``decode_plan(model, "lds")``) and its first LDS layer. For
each batch (1, 16, 64, 256) and target, one step ``(cache, x) -> (cache, next x)``:

* model: ``model.step`` on tokens ``[B]``, then the greedy next token (the decode loop's body);
* layer: ``LDSLayer.step`` on ``x [B, d_model]``, then ``tanh(y)`` as the next input (as
  ``bench_decode_layer.py`` feeds it back).

It is compiled once on its own (``jax.jit(step).lower(...).compile()``) for XLA's cost analysis
(``bytes accessed`` and ``flops`` of the optimized program; a dict in jax 0.10.2) and its
optimized HLO, and timed as a compiled ``lax.scan`` of ``--steps`` steps (default: the batch
bench's 2048 new tokens; median of ``--repeats`` runs after a compiling one) from an empty
cache. Copy bandwidth: ``x + 1`` over a float32 array of ``--copy-mib`` MiB (default 256) in the
same run, counted as read plus write (``2 x`` its bytes) over the median time.

State-sized arrays: in the optimized HLO of the step, outside fusion bodies (what a fusion
computes inside stays in registers), every instruction whose result (or an array of its tuple
result) has between half and all of the elements of one LDS state array of the cache (one of
its leaves, whatever the layout) and all of that array's dimensions but at most one among its
own: the state, any transposition of it, or one plane of it (the real or imaginary part of a
reduced layer's complex state; parameters, tuples, get-tuple-elements and bitcasts not
counted). Each new state array is one of them;
``beyond_state`` counts the rest. XLA's temporaries (``temp_bytes``, from its
memory analysis) give the bytes of what is materialised besides the inputs and outputs.

JSON (``--json PATH``, rewritten after every row, ``meta.partial`` true until the run ends; the
full run's is ``results/bench/step_bytes.json``, the printed table goes beside it as ``.txt``)::

    {"rows": [{"target": "model" | "layer", "batch", "state_bytes", "io_bytes", "temp_bytes",
               "bytes_accessed", "flops", "counted_flops", "step_seconds", "tokens_per_second",
               "bytes_per_second", "of_copy_bandwidth", "bytes_over_state", "bytes_over_io",
               "state_sized": {"count", "beyond_state", "arrays"}}, ...],
     "copy": {"bytes", "seconds", "bytes_per_second"}, "meta": {...}}

Per row, bytes and FLOPs are per token per sequence (one step of the batch over the batch):

* ``state_bytes``: the cache pytree's bytes;
* ``io_bytes``: the compiled step's arguments and outputs (XLA's memory analysis: the weights
  and tables it reads, the cache in and out, the tokens or input; arrays it never reads, such
  as the prefill kernels, are pruned), what a step that reads each input and writes each output
  once moves; ``temp_bytes``: its temporaries;
* ``bytes_accessed``, ``flops``: XLA's cost analysis; ``counted_flops``:
  ``bench_decode_batch.distilled_flops_per_token`` (model rows; None for layers);
* ``step_seconds``: one step of the whole batch; ``tokens_per_second``: batch over it;
  ``bytes_per_second``: XLA's bytes of one step over ``step_seconds``; ``of_copy_bandwidth``:
  that over the copy's;
* ``bytes_over_state``, ``bytes_over_io``: ``bytes_accessed`` over ``state_bytes`` and over
  ``io_bytes``;
* ``state_sized.arrays``: ``"op dtype[shape]"`` of the state-sized instructions.

``--quick``: the batch bench's tiny model, batches 1 and 2, 8 steps, a 4 MiB copy (checks the
path; the test runs it).

Usage: python experiments/bench_step_bytes.py [--quick] [--json PATH] [--batches B ...]
       [--steps N] [--repeats R] [--copy-mib M]
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_decode_batch import FULL, QUICK, distilled_flops_per_token, our_config
from decode_bench_common import cache_bytes_per_sequence, load
from flax import nnx
from timing import median_seconds

from spectral_jax.atomic_files import write_json_atomic, write_text_atomic
from spectral_jax.decode import generate as gen
from spectral_jax.decode.strategy import decode_plan
from spectral_jax.nn.lds_layer import LDSCache, LDSLayer
from spectral_jax.nn.model import SpectralModel

MODEL = "distilled_stu"  # bench_decode_batch's headline
# HLO instructions that name or regroup buffers without computing one
NOT_MATERIALISED = {"parameter", "tuple", "get-tuple-element", "bitcast"}
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s([a-z][\w-]*)\(")
ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def xla_costs(compiled) -> dict:
    """XLA's cost analysis of ``compiled`` (a ``jax.stages.Compiled``): a dict with
    ``"bytes accessed"`` and ``"flops"`` (jax 0.10.2); RuntimeError where the backend gives
    none."""
    costs = compiled.cost_analysis()
    if not isinstance(costs, dict) or "bytes accessed" not in costs or "flops" not in costs:
        raise RuntimeError(
            f"XLA's cost analysis on {jax.devices()[0].platform} gave {costs!r:.200} (no "
            "'bytes accessed' and 'flops'); this benchmark needs jax.stages.Compiled.cost_analysis"
        )
    return costs


def like_state(shape: list[int], state: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` is state-sized for a state array of shape ``state``:
    between half its elements and all of them, and all of its dimensions but at most one among
    ``shape``'s."""
    rest = list(shape)
    missing = 0
    for dim in state:
        if dim in rest:
            rest.remove(dim)
        else:
            missing += 1
    return missing <= 1 and math.prod(state) >= math.prod(shape) >= math.prod(state) / 2


def state_sized(hlo: str, states: list[tuple[int, ...]]) -> list[str]:
    """``"op dtype[shape]"`` of each array computed outside fusion bodies in the optimized
    ``hlo`` text that is state-sized (:func:`like_state`) for one of the shapes ``states``."""
    fused = set(re.findall(r"calls=%([\w.-]+)", hlo))
    found, inside = [], False
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%([\w.-]+)\s.*\{\s*$", line)
        if header:
            inside = header.group(1) in fused
            continue
        match = INSTRUCTION.match(line)
        if inside or not match or match.group(2) in NOT_MATERIALISED:
            continue
        for dtype, dims in ARRAY.findall(match.group(1)):
            shape = [int(d) for d in dims.split(",") if d]
            if any(like_state(shape, state) for state in states):
                found.append(f"{match.group(2)} {dtype}[{dims}]")
    return found


def lds_states(cache) -> list[jax.Array]:
    """The LDS state arrays of a model's or a layer's ``cache`` pytree: every leaf of the
    ``state`` of each :class:`LDSCache` in it (no assumption on their layout)."""
    caches = jax.tree.leaves(cache, is_leaf=lambda node: isinstance(node, LDSCache))
    return [leaf for c in caches if isinstance(c, LDSCache) for leaf in jax.tree.leaves(c.state)]


def profile_step(step: Callable, module: nnx.Module, cache, x, steps: int, repeats: int) -> dict:
    """Cost analysis, state-sized arrays and time of ``step(module, cache, x) -> (cache, x)``
    at ``x``'s batch: one step compiled alone, then ``steps`` of them in one ``lax.scan``."""
    graphdef, params = nnx.split(module)

    def one(params, cache, x):
        return step(nnx.merge(graphdef, params), cache, x)

    compiled = jax.jit(one).lower(params, cache, x).compile()
    costs, memory = xla_costs(compiled), compiled.memory_analysis()
    states = lds_states(cache)
    arrays = state_sized(compiled.as_text(), [s.shape for s in states])

    @jax.jit
    def loop(params, cache, x):
        def body(carry, _):
            return one(params, *carry), None

        return jax.lax.scan(body, (cache, x), None, length=steps)[0][1]

    seconds = median_seconds(loop, params, cache, x, repeats=repeats) / steps
    batch = x.shape[0]
    return {
        "batch": batch,
        "state_bytes": cache_bytes_per_sequence(cache, batch),
        "io_bytes": (memory.argument_size_in_bytes + memory.output_size_in_bytes) / batch,
        "temp_bytes": memory.temp_size_in_bytes / batch,
        "bytes_accessed": costs["bytes accessed"] / batch,
        "flops": costs["flops"] / batch,
        "step_seconds": seconds,
        "tokens_per_second": batch / seconds,
        "bytes_per_second": costs["bytes accessed"] / seconds,
        "state_sized": {
            "count": len(arrays),
            "beyond_state": len(arrays) - len(states),
            "arrays": arrays,
        },
    }


def model_step(model: SpectralModel, cache, tokens: jax.Array):
    """The decode loop's body: ``tokens [B]`` -> (cache, greedy next tokens ``[B]``)."""
    cache, logits = model.step(cache, tokens)
    return cache, gen.sample_tokens(logits, None, gen.GREEDY)


def layer_step(layer: LDSLayer, cache: LDSCache, x: jax.Array):
    """``x [B, D]`` -> (cache, ``tanh(y)`` the next input ``[B, D]``)."""
    cache, y = layer.step(cache, x)
    return cache, jnp.tanh(y)


def copy_bandwidth(mib: int, repeats: int) -> dict:
    """Bytes/s of ``x + 1`` over ``mib`` MiB of float32 (read plus write)."""
    x = jnp.zeros(mib * 2**20 // 4, jnp.float32)
    seconds = median_seconds(jax.jit(lambda x: x + 1), x, repeats=repeats)
    return {"bytes": 2 * x.nbytes, "seconds": seconds, "bytes_per_second": 2 * x.nbytes / seconds}


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, profile every (batch, target), write the JSON and the text table;
    returns the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (checks the path)")
    parser.add_argument("--json", type=Path, help="write the rows here (and the table beside)")
    parser.add_argument("--batches", nargs="+", type=positive, help="default 1 16 64 256")
    parser.add_argument("--steps", type=positive, help="steps per timed loop (default 2048)")
    parser.add_argument("--repeats", type=positive, default=3, help="timed loops per row")
    parser.add_argument("--copy-mib", type=positive, help="copied array, MiB (default 256)")
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    batches = args.batches or size["batches"]
    steps = args.steps or size["new"]
    copy_mib = args.copy_mib or (4 if args.quick else 256)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line)
        lines.append(line)

    say(f"jax {jax.__version__} on {jax.devices()[0].platform}, {platform.processor() or ''}")
    say(f"load before: {load()}")
    start = time.perf_counter()
    config = our_config(size, MODEL)
    model = decode_plan(SpectralModel(config, rngs=nnx.Rngs(0)), "lds").model
    layer = next(m for _, m in nnx.iter_modules(model) if isinstance(m, LDSLayer))
    doc: dict = {"rows": [], "copy": copy_bandwidth(copy_mib, args.repeats), "meta": {
        "quick": args.quick, "model": MODEL, "size": size, "steps": steps,
        "repeats": args.repeats, "copy_mib": copy_mib, "build_seconds": time.perf_counter() - start,
        "load_before": load(), "partial": True,
    }}  # fmt: skip
    copy = doc["copy"]["bytes_per_second"]
    say(f"copy (x + 1 over {copy_mib} MiB, read + write): {copy / 1e9:.2f} GB/s")
    say(f"{'target':>6} {'B':>4} {'state B/seq':>11} {'io B/seq':>10} {'temp B/seq':>10} "
        f"{'XLA B/seq':>10} "
        f"{'/state':>6} {'/io':>5} {'flop/seq':>9} {'us/step':>9} {'tok/s':>9} {'GB/s':>7} "
        f"{'of copy':>7} {'state-sized':>11}")  # fmt: skip
    for batch in batches:
        tokens = jnp.zeros((batch,), jnp.int32)
        targets = {
            "model": (model_step, model, model.init_cache(batch), tokens),
            "layer": (layer_step, layer, layer.init_cache(batch, 1),
                      jnp.full((batch, config.d_model), 0.1, jnp.float32)),
        }  # fmt: skip
        for target, (step, module, cache, x) in targets.items():
            row = {"target": target, **profile_step(step, module, cache, x, steps, args.repeats)}
            row["counted_flops"] = (
                distilled_flops_per_token(config, cache) if target == "model" else None
            )
            row["of_copy_bandwidth"] = row["bytes_per_second"] / copy
            row["bytes_over_state"] = row["bytes_accessed"] / row["state_bytes"]
            row["bytes_over_io"] = row["bytes_accessed"] / row["io_bytes"]
            doc["rows"].append(row)
            if args.json:
                write_json_atomic(args.json, doc)
            sized = row["state_sized"]
            say(f"{target:>6} {batch:>4} {row['state_bytes']:>11,} {row['io_bytes']:>10,.0f} "
                f"{row['temp_bytes']:>10,.0f} {row['bytes_accessed']:>10,.0f} "
                f"{row['bytes_over_state']:>6.2f} {row['bytes_over_io']:>5.2f} "
                f"{row['flops']:>9,.0f} {1e6 * row['step_seconds']:>9.1f} "
                f"{row['tokens_per_second']:>9,.0f} {row['bytes_per_second'] / 1e9:>7.2f} "
                f"{row['of_copy_bandwidth']:>7.2f} {sized['count']:>5} "
                f"({sized['beyond_state']} beyond)")  # fmt: skip
    for row in doc["rows"]:
        if row["state_sized"]["beyond_state"]:
            say(f"{row['target']} B={row['batch']}: state-sized arrays "
                f"{', '.join(row['state_sized']['arrays'])}")  # fmt: skip
    doc["meta"].update(jax=jax.__version__, device=str(jax.devices()[0]), load_after=load(),
                       partial=False)  # fmt: skip
    say(f"load after: {doc['meta']['load_after']}")
    if args.json:
        write_json_atomic(args.json, doc)
        write_text_atomic(args.json.with_suffix(".txt"), "\n".join(lines) + "\n")
        print(f"wrote {args.json} and {args.json.with_suffix('.txt')}")
    return doc


if __name__ == "__main__":
    main()
