"""Data: tokenizers, token shards on disk, and ``prepare-data`` (text files -> shards).

- :mod:`~spectral_jax.data.tokenizer`: the ``Tokenizer`` interface, bytes and Hugging Face
  ``tokenizers`` implementations, BPE training, save/load, streaming decode.
- :mod:`~spectral_jax.data.shards`: a directory of memory-mappable ``.npy`` token shards (ours, or
  flash-stu-2's) read as one token stream per split, by memory map or by byte ranges (``gs://``).
- :mod:`~spectral_jax.data.sources`: the documents of local ``.txt`` / ``.jsonl`` / ``.parquet``
  inputs (files, directories, globs) and of the standard-library corpus.
- :mod:`~spectral_jax.data.prepare`: ``prepare_data``: tokenize, split by document hash, write
  shards and a manifest, resumably.

This floor sits below training: it imports nothing from ``spectral_jax.train``.
"""
