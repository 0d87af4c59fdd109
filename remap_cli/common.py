"""Helpers the ``remap`` subcommands share once they run (after parsing)."""

from __future__ import annotations

from remap_cli import paths
from remap_tf.errors import InvalidInputError


def embedder_for(model: str):
    """The embedder for a ``--model`` value: an export folder or ``host:port[/name]``."""
    from remap_tf.serving.client import make_embedder  # imports TensorFlow: only when run

    return make_embedder(model)


def model_for_index(model: str | None, index) -> str:
    """``--model`` if given, else the model the index records; InvalidInputError if neither."""
    from remap_tf.serving.search import recorded_model

    model = model or recorded_model(index)
    if not model:
        raise InvalidInputError(
            "--model is required: this index does not record the model it was built with"
        )
    return model


def embeddings_output(flag: str, value, command: str, overwrite: bool = False) -> None:
    """A descriptor folder ``remap <command>`` writes or resumes (`remap_tf.serving.embeddings`):
    absent, empty or carrying remap's marker for that command (`embeddings.check_output`);
    any other only with ``--overwrite``, and a user's file of a shard's name never; a folder
    of the retired format gets how to convert it."""
    from remap_tf.serving import embeddings  # numpy: only when run

    with paths.naming(flag):
        embeddings.check_output(value, command, overwrite)
    # what is in the folder is checked above; here only that it can be written
    paths.output_dir(flag, value, "descriptor shards", lambda folder: True)
