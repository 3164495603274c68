"""Data plumbing shared by the trainer, the command line and the audit.

- :mod:`~etu_hf.data.corpus`: corpus specs (files, folders, hub datasets), loading and holding out documents;
- :mod:`~etu_hf.data.blocks`: token blocks (:func:`tokenize_and_block`), scored positions, batches;
- :mod:`~etu_hf.data.pairing`: forget/retain pairing for the retain term;
- :mod:`~etu_hf.data.token_counts`: counting scored tokens for V_S.

The public names of the former single ``etu_hf.data`` module are importable from here as before
(``from etu_hf.data import tokenize_and_block``); each submodule is imported on first use, so
``import etu_hf.data.corpus`` does not pull in torch.
"""

from __future__ import annotations

from etu_hf._lazy import lazy_exports

_EXPORTS = {
    "IGNORE_INDEX": "etu_hf.data.blocks",
    "MODEL_KEYS": "etu_hf.data.blocks",
    "check_token_dataset": "etu_hf.data.blocks",
    "iter_batches": "etu_hf.data.blocks",
    "scored_positions": "etu_hf.data.blocks",
    "tokenize_and_block": "etu_hf.data.blocks",
    "CORPUS_ALIASES": "etu_hf.data.corpus",
    "CorpusSpec": "etu_hf.data.corpus",
    "load_corpus": "etu_hf.data.corpus",
    "parse_corpus_specs": "etu_hf.data.corpus",
    "split_documents": "etu_hf.data.corpus",
    "CORPUS_ID_COLUMN": "etu_hf.data.pairing",
    "PASSTHROUGH_PREFIX": "etu_hf.data.pairing",
    "RETAIN_PREFIX": "etu_hf.data.pairing",
    "ForgetRetainCollator": "etu_hf.data.pairing",
    "ForgetRetainDataset": "etu_hf.data.pairing",
    "split_forget_retain": "etu_hf.data.pairing",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
