"""Streaming evaluation: next-token loss over long streams, chunk by chunk with carried state,
summarised per position bucket.

A model with no length limit (distilled LDS layers, sliding-window attention) can read a stream
far longer than the sequences it was trained on. :func:`stream_losses` feeds streams through
``model.step`` one jitted ``lax.scan`` of ``chunk`` tokens at a time, carrying the decode cache
from chunk to chunk, so memory stays constant whatever the stream's length; a model with STU
layers can read at most its ``max_len`` tokens (:meth:`SpectralModel.check_length` says so).

The pieces around it, each one function that every caller (``spectral-jax evaluate``,
``experiments/streaming_eval.py``) shares:

- :func:`text_tokens`: documents -> one token array, the way training data joins them;
- :func:`evenly_spaced_offsets` and :func:`cut_streams`: ``B`` disjoint streams of ``N + 1``
  tokens at evenly spaced offsets, with a seeded phase (different seeds, different offset sets);
- :func:`position_buckets` and :func:`bucket_summary`: bits/token and bits/byte over the
  positions ``[0, L/2)``, ``[L/2, L)``, ``[L, 2L)``, ``[2L, 4L)``, ... of each stream, ``L`` the
  training length;
- :func:`state_floats`: the decode state each block carries per sequence;
- :class:`StreamProgress`: a plain-text progress bar that also times the decode loop.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spectral_jax.data.tokenizer import Tokenizer
from spectral_jax.nn.mixer import DEFAULT_DECODE, DecodeOptions
from spectral_jax.validation import positive_int


@functools.partial(jax.jit, static_argnames="graphdef")
def _chunk_losses(graphdef, state, cache, inputs, targets):
    """inputs, targets: [B, C] -> (cache after the chunk, losses [B, C] in nats)."""
    model = nnx.merge(graphdef, state)

    def advance(cache, io):
        token, target = io
        cache, logits = model.step(cache, token)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target)
        return cache, loss

    cache, losses = jax.lax.scan(advance, cache, (inputs.T, targets.T))
    return cache, losses.T


def stream_losses(
    model: nnx.Module,
    streams: np.ndarray,
    *,
    chunk: int = 256,
    options: DecodeOptions = DEFAULT_DECODE,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Loss of predicting each next token of ``streams: [B, T + 1]`` int from all before it.

    Returns ``[B, T]`` float losses in nats: entry ``t`` is ``-log p(streams[:, t + 1] |
    streams[:, :t + 1])``. The streams are read ``chunk`` tokens per jitted call (the last
    chunk may be shorter), the cache carried over. Every program the loop calls is compiled
    (and run once, its result dropped) before the loop, so that the loop does no
    compilation. ``progress(done, T)``
    is called before the loop (``done = 0``) and after each chunk, once its losses are on the
    host. Raises ValueError if a layer cannot run ``T`` positions (STU layers past their
    ``max_len``).
    """
    streams = np.asarray(streams)
    if streams.ndim != 2 or streams.shape[1] < 2 or not np.issubdtype(streams.dtype, np.integer):
        raise ValueError(f"streams must be int [B, T + 1] with T >= 1, got {streams.shape}")
    positive_int("stream_losses", "chunk", chunk)
    batch, length = streams.shape[0], streams.shape[1] - 1
    model.check_length(length, f"a stream of {length} positions")
    limit = model.length_limit
    cache = model.init_cache(batch, length if limit is None else limit, options=options)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(streams, jnp.int32)

    def run(cache, start: int, size: int):
        inputs, targets = tokens[:, start : start + size], tokens[:, start + 1 : start + size + 1]
        return _chunk_losses(graphdef, state, cache, inputs, targets)

    # Compile before the loop: one call, results dropped, for each program the loop runs. A
    # carried cache is placed like the parameters, not like the initial cache, so the first
    # chunk's program is not the later ones'; a shorter last chunk has its own.
    starts = range(0, length, chunk)
    carried = cache
    for initial, size in sorted({(s == 0, min(chunk, length - s)) for s in starts}, reverse=True):
        result = jax.block_until_ready(run(cache if initial else carried, 0, size))
        carried = result[0] if initial else carried
    if progress is not None:
        progress(0, length)
    losses = []
    for start in starts:
        cache, part = run(cache, start, min(chunk, length - start))
        losses.append(np.asarray(part))
        if progress is not None:
            progress(start + part.shape[1], length)
    return np.concatenate(losses, axis=1)


class StreamProgress:
    """A ``progress`` callback for :func:`stream_losses`: a one-line bar on ``file`` (plain
    text, redrawn with ``\\r``) and the wall time of the decode loop, compilation excluded.

    ``us_per_token``: microseconds per position per stream (``seconds / (streams * T)``): the
    cost of one token of one stream when ``streams`` are decoded side by side.
    """

    def __init__(self, label: str, streams: int, *, file: IO[str] | None = sys.stderr):
        self.label, self.streams, self.file = label, streams, file
        self.start = self.seconds = 0.0
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0:
            self.start = now
        self.seconds, self.done = now - self.start, done
        if self.file is None:
            return
        filled = 30 * done // total
        rate = self.streams * done / max(self.seconds, 1e-9)
        self.file.write(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} positions "
            f"x {self.streams} streams, {rate:,.0f} tokens/s"
        )
        if done == total:
            self.file.write("\n")
        self.file.flush()

    @property
    def us_per_token(self) -> float:
        return 1e6 * self.seconds / max(self.streams * self.done, 1)


def text_tokens(
    documents: Iterable[str], tokenizer: Tokenizer, vocab_size: int, *, batch: int = 256
) -> tuple[np.ndarray, str]:
    """The documents as one ``[T]`` int32 token array, and how they were joined.

    Documents are joined as the model's training data joins them: each followed by the
    tokenizer's end-of-text id (as ``prepare-data`` writes shards) when ``vocab_size`` holds
    that id; otherwise (a byte-level model of vocabulary 256, trained on files end to end)
    back to back. They are encoded ``batch`` at a time. A ValueError names the first document
    that is not encodable text (a lone surrogate, e.g. from a JSON escape), that the tokenizer
    does not reproduce (``decode(encode(text)) != text``: characters it cannot encode) or that
    encodes to an id outside ``vocab_size``; no document at all is one too.
    """
    eot = tokenizer.eot_id
    joined = f"end-of-text id {eot}" if eot is not None and eot < vocab_size else "nothing"
    tail = [eot] if joined != "nothing" else []
    pieces: list[np.ndarray] = []

    def encode(docs: list[str]) -> None:
        for doc, ids in zip(docs, tokenizer.encode_batch(docs), strict=True):
            where = f"document {len(pieces)} (starting {doc[:30]!r})"
            if tokenizer.decode(ids) != doc:
                raise ValueError(
                    f"{where} does not survive the checkpoint's {tokenizer.kind} tokenizer "
                    "(decode(encode(text)) differs): it holds text the tokenizer cannot encode"
                )
            if ids and max(ids) >= vocab_size:
                raise ValueError(
                    f"{where} encodes to id {max(ids)}, outside the model's vocabulary "
                    f"{vocab_size}: the checkpoint's tokenizer does not fit its model"
                )
            pieces.append(np.asarray(ids + tail, np.int32))

    docs: list[str] = []
    for doc in documents:
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"document {len(pieces) + len(docs)} (starting {doc[:30]!r}) holds text no "
                f"tokenizer can encode: {err.reason} at character {err.start}"
            ) from None
        docs.append(doc)
        if len(docs) == batch:
            encode(docs)
            docs = []
    if docs:
        encode(docs)
    if not pieces:
        raise ValueError("the inputs hold no non-empty document: nothing to evaluate")
    return np.concatenate(pieces), joined


def evenly_spaced_offsets(total: int, count: int, length: int, seed: int = 0) -> np.ndarray:
    """``[count]`` int64 start offsets of ``count`` disjoint windows of ``length + 1`` tokens
    in a text of ``total`` tokens: ``shift + i * (total // count)``, ``shift`` drawn uniformly
    from ``[0, total // count - length - 1]`` by ``seed``. Too little text is a ValueError
    (never a truncation or wrap-around)."""
    positive_int("evenly_spaced_offsets", "streams", count)
    positive_int("evenly_spaced_offsets", "stream length", length)
    positive_int("evenly_spaced_offsets", "seed", seed, minimum=0)
    stride = total // count
    if stride < length + 1:
        raise ValueError(
            f"the text holds {total} tokens, too few for {count} disjoint streams of "
            f"{length} + 1 tokens ({count * (length + 1)} needed): lower --streams or "
            "--stream-len, or add text"
        )
    shift = int(np.random.default_rng(seed).integers(0, stride - length))
    return shift + stride * np.arange(count, dtype=np.int64)


def cut_streams(tokens: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """``tokens: [T]`` -> ``[len(offsets), length + 1]`` int32 windows starting at ``offsets``."""
    return np.stack([tokens[o : o + length + 1] for o in offsets]).astype(np.int32)


class Bucket(NamedTuple):
    """Positions ``[start, stop)`` of a stream; ``cut``: ``stop`` is the stream's end, short of
    the bucket's full end; ``label`` in units of the training length, e.g. ``"[L, 2L)"``."""

    start: int
    stop: int
    label: str
    cut: bool


def _in_train_lengths(position: int, train_len: int) -> str:
    """``position`` as a multiple of the training length ``L``: ``0``, ``L/2``, ``L``, ``4L``,
    ``3.91L``."""
    if position == 0:
        return "0"
    if position == train_len // 2 and position < train_len:
        return "L/2"
    ratio = position / train_len
    return "L" if ratio == 1 else f"{ratio:.3g}L"


def position_buckets(train_len: int, stream_len: int) -> list[Bucket]:
    """``[0, L/2)``, ``[L/2, L)``, ``[L, 2L)``, ``[2L, 4L)``, ... up to ``stream_len`` (``L =
    train_len``, ``L/2`` rounded down); the last bucket is cut at ``stream_len`` if it falls
    inside one. A stream shorter than the first bucket is a ValueError."""
    positive_int("position_buckets", "train_len", train_len)
    positive_int("position_buckets", "stream_len", stream_len)
    edges = sorted({0, train_len // 2, train_len})
    if stream_len < edges[1]:
        raise ValueError(
            f"a stream of {stream_len} tokens is shorter than the first position bucket "
            f"[0, {edges[1]}) (half the training length {train_len}): pass --stream-len >= "
            f"{edges[1]}"
        )
    while edges[-1] < stream_len:
        edges.append(2 * edges[-1])
    buckets = []
    for start, stop in itertools.pairwise(edges):
        if start >= stream_len:
            break
        cut = stop > stream_len
        end = stream_len if cut else stop
        label = f"[{_in_train_lengths(start, train_len)}, {_in_train_lengths(end, train_len)})"
        buckets.append(Bucket(start, end, label + (" (cut at N)" if cut else ""), cut))
    return buckets


def bucket_summary(
    losses: np.ndarray, target_bytes: np.ndarray | None, buckets: list[Bucket]
) -> list[dict[str, Any]]:
    """Per bucket: ``start``, ``stop``, ``label``, ``cut``, ``tokens`` (positions summed over
    the streams), ``bits_per_token`` (mean loss in bits) and ``bits_per_byte`` (total loss in
    bits over the UTF-8 bytes of the predicted tokens; ``None`` without ``target_bytes`` or
    with no bytes in the bucket).

    losses: ``[B, T]`` nats (:func:`stream_losses`). target_bytes: ``[B, T]`` bytes of the token
    predicted at each position (``token_byte_lengths(tokenizer)[streams[:, 1:]]``), or None.
    """
    rows = []
    for bucket in buckets:
        part = np.asarray(losses[:, bucket.start : bucket.stop], np.float64)
        bits = float(part.sum()) / math.log(2)
        nbytes = None
        if target_bytes is not None:
            nbytes = int(target_bytes[:, bucket.start : bucket.stop].sum())
        rows.append(
            {
                "start": bucket.start,
                "stop": bucket.stop,
                "label": bucket.label,
                "cut": bucket.cut,
                "tokens": int(part.size),
                "bits_per_token": bits / part.size,
                "bits_per_byte": bits / nbytes if nbytes else None,
            }
        )
    return rows


def state_floats(
    model: nnx.Module, length: int, options: DecodeOptions = DEFAULT_DECODE
) -> list[int]:
    """Per block, the floating-point numbers of decode state one sequence carries when it reads
    ``length`` positions (the cache :func:`stream_losses` builds; shapes only, nothing is
    allocated; a complex number counts as two). Integer counters are not counted."""
    limit = model.length_limit
    cache = jax.eval_shape(
        lambda: model.init_cache(1, length if limit is None else limit, options=options)
    )

    def floats(leaf) -> int:
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            return 2 * math.prod(leaf.shape)  # a reduced LDS layer's complex slots
        return math.prod(leaf.shape) if jnp.issubdtype(leaf.dtype, jnp.floating) else 0

    return [sum(floats(leaf) for leaf in jax.tree.leaves(layer)) for layer in cache.layers]
