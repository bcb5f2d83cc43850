"""Peak memory (RSS) and seconds of model prefills, each case in its own process.

Every case runs in a child process (``--child CASE_JSON``), which builds its model with random
weights, distils it for ``lds`` (:func:`~spectral_jax.decode.strategy.decode_plan`, the default
bank; fits are cached on disk), resets its peak RSS (``/proc/self/clear_refs``), and calls
:func:`spectral_jax.decode.generate.prefill` on a random prompt, then decodes ``steps`` tokens
if the case has any. The peak RSS is the child's ``VmHWM`` after that (so it covers the
prefill's compilation and run, and the decode), next to ``rss_before`` (the model, the prompt
and the JAX runtime). Prefill seconds are a second, compiled call when the first took under a
quarter of ``--case-timeout``, else the first (``prefill_includes_compile``). The parent watches
the child's RSS and kills it above ``--max-rss-gib`` (the machine is shared), or past
``--case-timeout``; such a case, or one that raises, is a row with its ``status`` and
``error``, never dropped.

Cases (the models of ``bench_decode_model.py``: 4 layers, d_model 128, K 24, vocab 256,
``max_len`` 131072 + 8192; ``headline`` = STU-only tensordot, ``hybrid`` = STU and attention
layers, tensordot):

* ``lds``: the distilled headline and hybrid models, prompts 2^14, 2^16, 2^18, 2^20, batch 1
  and 16, the default :class:`~spectral_jax.nn.mixer.DecodeOptions` (chunked prefill);
* ``stu``: the STU models themselves with naive and FutureFill, prompts up to their max_len;
* ``futurefill_full``: the STU-only full-projection model, a 2^17 prompt in one pass
  (``prefill_chunk=None``: an STU's prompt is bounded by its max_len, and each chunk of a
  chunked one would convolve the whole history again), then an epoch and one token of
  FutureFill steps, so that one FFT refresh over the whole history runs;
* ``chunk_ratio``: the distilled headline and hybrid at 32k, chunked (the default
  ``prefill_chunk``) and unchunked (``prefill_chunk=None``) prefills alternated in one process,
  median of ``--repeats`` each: tokens/s of both and their ratio.

The cases the issue's must-shows need run first. ``--quick``: tiny models and prompts (seconds
per case). JSON (``--json``, rewritten after every case): ``{"rows": [...], "summary": {...},
"not_run": [...], "meta": {...}}``
(``not_run``: the cases a run cut short did not reach; ``meta.partial`` while any remain).

Usage: python experiments/bench_memory.py [--quick] [--json PATH] [--only KIND ...]
       [--case-timeout S] [--max-rss-gib G] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from spectral_jax.ops.conv_decode import default_block_len

GIB = 2**30
FULL = {"d_model": 128, "num_layers": 4, "max_len": 131072 + 8192, "num_filters": 24}
QUICK = {"d_model": 32, "num_layers": 2, "max_len": 1024 + 256, "num_filters": 8}
MODELS = {  # name: (layer pattern, projection)
    "headline": ("S", "tensordot"),
    "hybrid": ("SA", "tensordot"),
    "stu_full": ("S", "full"),
}
KINDS = ("lds", "chunk_ratio", "futurefill_full", "stu")
ROOT = Path(__file__).resolve().parent.parent


def cases(quick: bool) -> list[dict]:
    """Every case of a run, the must-show ones first."""
    size = QUICK if quick else FULL
    prompts = (256, 512, 1024) if quick else (2**14, 2**16, 2**18, 2**20)
    ratio_at, batches = (512, (1, 2)) if quick else (32768, (1, 16))
    first = [prompts[1], prompts[-1]]  # the ratio RSS(2^20) / RSS(2^16)

    def case(kind, model, strategy, prompt, batch, **extra):
        return {"kind": kind, "model": model, "strategy": strategy, "prompt": prompt,
                "batch": batch, "config": size, **extra}  # fmt: skip

    lds = [
        case("lds", model, "lds", prompt, batch)
        for batch in batches
        for prompt in (first if batch == 1 else [prompts[-1]])
        for model in ("headline", "hybrid")
    ]
    epoch = 256 if quick else default_block_len("futurefill", size["max_len"])
    steps = epoch + 1  # the epoch started by the prefill, then one refresh
    rest = [
        case("chunk_ratio", model, "lds", ratio_at, 1, chunk=128 if quick else "default")
        for model in ("headline", "hybrid")
    ]
    rest.append(
        case("futurefill_full", "stu_full", "futurefill", 768 if quick else 2**17, 1,
             steps=steps, block_len=epoch, chunk=None)
    )  # fmt: skip
    rest += [
        case("lds", model, "lds", prompt, batch)
        for batch in batches
        for prompt in prompts
        for model in ("headline", "hybrid")
        if not (batch == 1 and prompt in first) and not (batch > 1 and prompt == prompts[-1])
    ]
    rest += [
        case("stu", model, strategy, prompt, batch)
        for batch in batches
        for prompt in prompts
        if prompt <= size["max_len"]
        for model in ("headline", "hybrid")
        for strategy in ("naive", "futurefill")
    ]
    return lds[:4] + rest[:3] + lds[4:] + rest[3:]


# ---- the child: one case, measured in its own process -------------------------------------


def read_status(pid: int | str, field: str) -> int | None:
    """``field`` (e.g. ``VmHWM``) of ``/proc/PID/status`` in bytes, None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> tuple[int, str]:
    """This process's peak RSS in bytes and where it came from."""
    hwm = read_status("self", "VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def options_for(case: dict):
    """The case's DecodeOptions: its strategy, FutureFill epoch, and ``prefill_chunk`` (absent
    or ``"default"``: DecodeOptions' default; None: one pass)."""
    from spectral_jax.nn.mixer import DecodeOptions

    strategy = "futurefill" if case["strategy"] == "lds" else case["strategy"]
    kwargs = {"block_len": case.get("block_len")}
    if case.get("chunk", "default") != "default":
        kwargs["prefill_chunk"] = case["chunk"]
    return DecodeOptions(strategy, **kwargs)


def build(case: dict):
    """``(model, prompt [B, L])`` of a case: random weights, distilled for ``lds``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from spectral_jax.decode.strategy import decode_plan
    from spectral_jax.nn.model import ModelConfig, SpectralModel

    pattern, projection = MODELS[case["model"]]
    config = ModelConfig(
        vocab_size=256, layer_pattern=pattern, stu_projection=projection, **case["config"]
    )
    model = SpectralModel(config, rngs=nnx.Rngs(0))
    if case["strategy"] == "lds":
        model = decode_plan(model, "lds").model
    key = jax.random.key(case["prompt"])
    prompt = jax.random.randint(key, (case["batch"], case["prompt"]), 0, 256, jnp.int32)
    return model, prompt


def timed(fn, *args):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def run_child(case: dict, case_timeout: float, repeats: int) -> dict:
    """Measure one case in this process (see the module docstring)."""
    import gc

    from spectral_jax.decode import generate as gen

    model, prompt = build(case)
    tokens = prompt.shape[0] * prompt.shape[1]
    gc.collect()
    result: dict = {"peak_reset": reset_peak(), "rss_before": read_status("self", "VmRSS")}
    if case["kind"] == "chunk_ratio":  # alternate the two, same process, same load
        chunked, unchunked = options_for(case), options_for({**case, "chunk": None})
        both = {"chunked": chunked, "unchunked": unchunked}
        seconds = {name: [] for name in both}
        for options in both.values():
            timed(gen.prefill, model, prompt, options)  # compiles
        for _ in range(repeats):
            for name, options in both.items():
                seconds[name].append(timed(gen.prefill, model, prompt, options)[1])
        for name, values in seconds.items():
            result[f"{name}_seconds"] = statistics.median(values)
            result[f"{name}_tokens_per_second"] = tokens / statistics.median(values)
        result["prefill_chunk"] = chunked.prefill_chunk
        result["chunked_over_unchunked"] = result["unchunked_seconds"] / result["chunked_seconds"]
    else:
        options = options_for(case)
        (logits, cache), first = timed(gen.prefill, model, prompt, options)
        result["prefill_chunk"] = getattr(options, "prefill_chunk", "n/a")
        if first < case_timeout / 4:
            del logits, cache
            (logits, cache), result["prefill_seconds"] = timed(gen.prefill, model, prompt, options)
            result["prefill_includes_compile"] = False
        else:
            result["prefill_seconds"], result["prefill_includes_compile"] = first, True
        result["prefill_tokens_per_second"] = tokens / result["prefill_seconds"]
        if case.get("steps"):
            _, result["decode_seconds"] = timed(gen.decode, model, cache, logits, case["steps"])
            result["decode_positions"] = [prompt.shape[1], prompt.shape[1] + case["steps"] - 1]
    result["peak_rss"], result["rss_source"] = peak_rss()
    return result


# ---- the parent: one child per case, its RSS watched --------------------------------------


def run_case(case: dict, case_timeout: float, max_rss: int, repeats: int) -> dict:
    """Run ``case`` in a child process; returns the row (``status`` ``ok``, ``error``,
    ``timeout`` or ``over_memory_cap``; the parent kills the child past either limit)."""
    command = [sys.executable, __file__, "--child", json.dumps(case)]
    command += ["--case-timeout", str(case_timeout), "--repeats", str(repeats)]
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    watched, status = 0, None
    while child.poll() is None:
        rss = read_status(child.pid, "VmRSS") or 0
        watched = max(watched, rss)
        if rss > max_rss:
            status = "over_memory_cap"
        elif time.perf_counter() - start > case_timeout:
            status = "timeout"
        if status:
            child.kill()
            break
        time.sleep(0.1)
    out, err = child.communicate()
    row = {k: v for k, v in case.items() if k != "config"}
    row.update(wall_seconds=time.perf_counter() - start, watched_rss=watched)
    results = [line for line in out.decode().splitlines() if line.startswith("RESULT ")]
    if status is None and child.returncode == 0 and results:
        row.update(status="ok", **json.loads(results[-1][len("RESULT ") :]))
    else:
        tail = err.decode().strip().splitlines()[-1:] or [f"exit code {child.returncode}"]
        limits = {
            "timeout": f"over {case_timeout:.0f} s",
            "over_memory_cap": f"RSS over {max_rss / GIB:.1f} GiB",
        }
        row.update(status=status or "error", error=limits.get(status, tail[0]))
    return row


def describe(row: dict) -> str:
    tag = f"{row['kind']:>15} {row['model']:>8} {row['strategy']:>10}"
    tag += f" L={row['prompt']:<8} B={row['batch']:<3}"
    if row["status"] != "ok":
        watched = f"RSS watched up to {row['watched_rss'] / GIB:.2f} GiB"
        return f"{tag} {row['status']}: {row['error']} ({watched} in {row['wall_seconds']:.0f} s)"
    if row["kind"] == "chunk_ratio":
        return (f"{tag} chunked {row['chunked_tokens_per_second']:.0f} tok/s, unchunked "
                f"{row['unchunked_tokens_per_second']:.0f} tok/s: ratio "
                f"{row['chunked_over_unchunked']:.2f} (chunk {row['prefill_chunk']})")  # fmt: skip
    text = (f"{tag} peak {row['peak_rss'] / GIB:6.2f} GiB (before {row['rss_before'] / GIB:.2f})"
            f"  prefill {row['prefill_seconds']:8.2f} s")  # fmt: skip
    if "decode_seconds" in row:
        text += f"  + {row['steps']} steps {row['decode_seconds']:.1f} s"
    return text


def summarize(rows: list[dict], quick: bool) -> dict:
    """The must-show figures, from the rows that ran (None where a case did not). A case cut
    short (timeout) adds ``..._watched_gib``: the largest RSS the parent saw before it stopped,
    a lower bound on its peak."""
    mid, top = (512, 1024) if quick else (2**16, 2**20)
    ok = {(r["kind"], r["model"], r["prompt"], r["batch"]): r for r in rows if r["status"] == "ok"}
    cut = {(r["kind"], r["model"], r["prompt"], r["batch"]): r for r in rows if r["status"] != "ok"}

    def peak(model, prompt, batch):
        row = ok.get(("lds", model, prompt, batch))
        return None if row is None else row["peak_rss"] / GIB

    summary: dict = {}
    big = 2 if quick else 16
    for model in ("headline", "hybrid"):
        low, high = peak(model, mid, 1), peak(model, top, 1)
        summary[f"{model}_rss_ratio_{top}_over_{mid}_batch1"] = (
            None if low is None or high is None else high / low
        )
        summary[f"{model}_batch{big}_{top}_gib"] = peak(model, top, big)
        if ("lds", model, top, big) in cut:
            row = cut[("lds", model, top, big)]
            summary[f"{model}_batch{big}_{top}_{row['status']}_watched_gib"] = (
                row["watched_rss"] / GIB
            )
        ratio = next(
            (r for (k, m, _, _), r in ok.items() if (k, m) == ("chunk_ratio", model)), None
        )
        summary[f"{model}_chunked_over_unchunked_tokens_per_second"] = (
            None if ratio is None else ratio["chunked_over_unchunked"]
        )
    ff = next((r for (k, *_), r in ok.items() if k == "futurefill_full"), None)
    summary["futurefill_full_gib"] = None if ff is None else ff["peak_rss"] / GIB
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and prompts")
    parser.add_argument("--json", type=Path, help="write the rows here (after every case)")
    parser.add_argument("--only", nargs="+", choices=KINDS, default=KINDS, help="case kinds")
    parser.add_argument("--case-timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--max-rss-gib", type=float, default=20.0, help="kill a case above")
    parser.add_argument("--repeats", type=int, default=3, help="chunk_ratio: timed runs each")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_child(json.loads(args.child), args.case_timeout, args.repeats)
        print("RESULT " + json.dumps(result))
        return

    import jax

    from spectral_jax.atomic_files import write_json_atomic

    meta = {
        "quick": args.quick, "case_timeout": args.case_timeout, "max_rss_gib": args.max_rss_gib,
        "repeats": args.repeats, "config": QUICK if args.quick else FULL, "jax": jax.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "load_before": os.getloadavg(),
    }  # fmt: skip
    print(f"jax {jax.__version__}, load {os.getloadavg()}")
    rows: list[dict] = []
    todo = [c for c in cases(args.quick) if c["kind"] in args.only]
    for i, case in enumerate(todo):
        row = run_case(case, args.case_timeout, args.max_rss_gib * GIB, args.repeats)
        rows.append({**row, "load_after": os.getloadavg()})
        print(describe(row), flush=True)
        if args.json:  # the cases not run yet are listed, so a run cut short drops none
            not_run = [{k: v for k, v in c.items() if k != "config"} for c in todo[i + 1 :]]
            summary = summarize(rows, args.quick)
            write_json_atomic(args.json, {"rows": rows, "not_run": not_run, "summary": summary,
                                          "meta": {**meta, "partial": bool(not_run)}})  # fmt: skip
    print(json.dumps(summarize(rows, args.quick), indent=1))
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
