"""Datasets for memory models: a split as contiguous token streams, served block by block."""

from .streams import (  # noqa: F401
    StreamBatches,
    StreamEpochBatchIterator,
    StreamLayout,
    StreamSplit,
    TokenSequence,
    dictionary_fingerprint,
)
