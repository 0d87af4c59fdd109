"""Nearest-neighbour indexes over descriptors: one interface, a registry of kinds, one loader.

One module per concept (docs/architecture.md, "Where to add things: an index"):

- `base`: ``Index``, the interface every kind implements, and ``load_index``, the one entry
  point for any index on disk (it dispatches on the manifest's kind through `registry`);
- `registry`: the kind name -> class table (``@register("exact")``) and ``make_index``;
- `files`: the on-disk side shared by every kind: format constants, manifest verification,
  staged writes, and the checks of ids and descriptor rows;
- `rows`: ``RowIndex``, a single index whose base class keeps the ids, row by row, and
  ``LazyRows``, rows read only when a build needs them (`pending`: a ScaNN build's passes
  over them);
- `exact` (``ExactIndex``, the yardstick), `scann` (``ScannIndex``, ``ScannConfig``),
  `sharded` (``ShardedIndex``: id-hash shards of either);
- `tuning`: recall-targeted tuning of ScaNN's search-time knobs;
- `changelog`: ``DurableIndex``, the write-ahead log that keeps an index durable between
  snapshots.

Importing this package registers every kind; the public names are re-exported here, so
``from remap_tf.serving.index import ScannIndex, load_index`` is all a user needs.

Example:
    >>> index = ScannIndex(dim=256)
    >>> index.add(["a.jpg", "b.jpg"], descriptors)        # (2, 256)
    >>> ids, scores = index.search(query_descriptors, k=1)  # (num_queries, 1) each
    >>> index.save("my_index"); same = load_index("my_index")
"""

from remap_tf.serving.index.base import Index, load_index
from remap_tf.serving.index.changelog import (
    DurableIndex,
    LogInUseError,
    compact_index,
    load_current,
    pending_changes,
)
from remap_tf.serving.index.exact import ExactIndex, top_k
from remap_tf.serving.index.files import FORMAT, FORMAT_VERSION, saved_kind, verify_index
from remap_tf.serving.index.registry import kinds, make_index, register
from remap_tf.serving.index.rows import LazyRows, RowIndex
from remap_tf.serving.index.scann import ScannConfig, ScannIndex
from remap_tf.serving.index.sharded import ShardedIndex, merge_top_k, shard_of
from remap_tf.serving.index.tuning import tune_search
from remap_tf.serving.manifest import IndexFormatError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DurableIndex",
    "ExactIndex",
    "Index",
    "IndexFormatError",
    "LogInUseError",
    "LazyRows",
    "RowIndex",
    "ScannConfig",
    "ScannIndex",
    "ShardedIndex",
    "compact_index",
    "kinds",
    "load_current",
    "load_index",
    "make_index",
    "merge_top_k",
    "pending_changes",
    "register",
    "saved_kind",
    "shard_of",
    "top_k",
    "tune_search",
    "verify_index",
]
