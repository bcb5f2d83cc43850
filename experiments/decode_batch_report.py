"""What ``bench_decode_batch.py`` reports from its rows: the issue's must-show ratios, their
printout, and the plot of tokens/s against batch (``from decode_batch_report import ...``: the
scripts run as ``python experiments/NAME.py``, so this folder is on the path). Rows: see
:mod:`bench_decode_batch`."""

from __future__ import annotations

from pathlib import Path

from spectral_jax.atomic_files import write_atomic


def ratios(rows: list[dict]) -> dict:
    """The issue's must-show ratios from the measured rows (a ratio whose rows are missing is
    left out): distilled_stu over griffin_recurrent tokens/s at each batch, distilled_stu's
    batch-64 over its batch-1 tokens/s, its batch-64 fraction of the matmul limit, and its
    state bytes per sequence over Griffin's (at the largest batch both ran, where the caches'
    scalar position weighs least)."""
    by = {(r["model"], r["batch"]): r for r in rows if "skipped" not in r}
    ours, peer = "distilled_stu", "griffin_recurrent"
    both = sorted(b for m, b in by if m == ours and (peer, b) in by)
    out: dict = {
        "over_griffin_recurrent": {
            b: by[(ours, b)]["tokens_per_second"] / by[(peer, b)]["tokens_per_second"] for b in both
        }
    }
    if (ours, 64) in by and (ours, 1) in by:
        out["batch64_over_batch1"] = (
            by[(ours, 64)]["tokens_per_second"] / by[(ours, 1)]["tokens_per_second"]
        )
    if (ours, 64) in by:
        out["batch64_of_limit"] = by[(ours, 64)]["of_limit"]
    if both:
        b = both[-1]
        out["state_bytes_over_griffin"] = (
            by[(ours, b)]["cache_bytes"] / by[(peer, b)]["cache_bytes"]
        )
    return out


def plot(rows: list[dict], path: Path) -> None:
    """tokens/s against batch, one line per model, each model's matmul limit dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        done = sorted((r["batch"], r) for r in rows if r["model"] == name and "skipped" not in r)
        if not done:
            continue
        batches = [b for b, _ in done]
        (line,) = ax.plot(batches, [r["tokens_per_second"] for _, r in done], marker="o",
                          label=name)  # fmt: skip
        ax.plot(batches, [r["limit_tokens_per_second"] for _, r in done], ls="--", lw=0.8,
                color=line.get_color())  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="decode tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_title("decode tokens/s (solid) and matmul limit (dashed)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))


def summarize(r: dict) -> None:
    """Print the must-show ratios."""
    for batch, ratio in r["over_griffin_recurrent"].items():
        print(f"distilled_stu / griffin_recurrent at batch {batch}: {ratio:.2f}x")
    if "batch64_over_batch1" in r:
        print(f"distilled_stu batch 64 / batch 1: {r['batch64_over_batch1']:.2f}x")
    if "batch64_of_limit" in r:
        print(f"distilled_stu batch 64: {r['batch64_of_limit']:.2f} of its matmul limit")
    if "state_bytes_over_griffin" in r:
        print(f"state bytes per sequence / Griffin's: {r['state_bytes_over_griffin']:.1f}x")
