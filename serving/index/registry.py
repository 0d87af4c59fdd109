"""The kinds of index: a name -> class table that each implementation module fills.

An implementation registers itself with ``@register("exact")`` (the name is its ``kind``, the
``"kind"`` of its saved manifest); `remap_tf.serving.index.base.Index.load` and `make_index`
look kinds up here, so no class names another and a new kind is one new module (imported by
the package's ``__init__``).
"""

from __future__ import annotations

from remap_tf.errors import InvalidInputError

_KINDS: dict[str, type] = {}
_COMPOSITE: set[str] = set()


def register(kind: str, composite: bool = False):
    """Class decorator: records the class under ``kind`` and sets its ``kind`` attribute.

    Args:
        kind: the name, also the ``"kind"`` of the manifest it saves.
        composite: an index made of other indexes (sharded), made with its own constructor
            rather than `make_index`.
    """

    def decorate(cls: type) -> type:
        if kind in _KINDS and _KINDS[kind] is not cls:
            raise ValueError(f"index kind {kind!r} is already registered by {_KINDS[kind]}")
        cls.kind = kind
        _KINDS[kind] = cls
        if composite:
            _COMPOSITE.add(kind)
        return cls

    return decorate


def kinds(composite: bool = True) -> list[str]:
    """The registered kind names, sorted (``composite=False``: those `make_index` makes)."""
    return sorted(k for k in _KINDS if composite or k not in _COMPOSITE)


def index_class(kind: str) -> type | None:
    """The class registered as ``kind`` (None for an unknown kind)."""
    return _KINDS.get(kind)


def make_index(kind: str, dim: int, **config):
    """An empty index of ``kind`` ("scann", "exact" or any other registered kind that is not
    composite), made with ``config``.

    Raises:
        InvalidInputError: an unknown kind.
    """
    if kind not in kinds(composite=False):
        raise InvalidInputError(f"index kind must be one of {kinds(composite=False)}, got {kind!r}")
    return _KINDS[kind](dim, **config)
