"""What a collection folder holds, and which ids it can hold (serving.collection)."""

import logging

import pytest

from remap_tf.serving.collection import id_problem, list_images


@pytest.mark.parametrize(
    "item",
    ["a.jpg", "new/1.JPG", "café/ü.png", "x" * 251 + ".gif", "two\nlines.png"],
)
def test_ids_a_folder_listing_finds_again(item):
    assert id_problem(item) is None


@pytest.mark.parametrize(
    "item, reason",
    [
        ("", "non-empty"),
        ("x.txt", "image extension"),
        ("noext", "image extension"),
        (".hidden.jpg", "hidden"),
        ("d/.h/a.jpg", "hidden"),
        ("d/../a.jpg", "'..'"),
        ("d//a.jpg", "empty"),
        ("/etc/a.jpg", "relative"),
        ("a\0b.jpg", "NUL"),
        ("x" * 300 + ".jpg", "255 bytes"),
        ("caf\udce9.jpg", "not valid UTF-8"),
    ],
)
def test_ids_a_rebuild_would_drop_are_refused_with_the_reason(item, reason):
    assert reason in id_problem(item)


def test_a_name_that_is_not_utf8_is_skipped_with_one_warning(tmp_path, caplog):
    """Issue 21, item 14: such a name crashed ``remap index build`` (UnicodeEncodeError when
    the ids were written); it is now left out and named, escaped, in one warning."""
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    bad = (str(tmp_path).encode() + b"/caf\xe9.jpg").decode("utf-8", "surrogateescape")
    with open(bad, "wb") as handle:
        handle.write(b"\xff\xd8\xff")
    with caplog.at_level(logging.WARNING, "remap_tf.serving.collection"):
        paths, ids = list_images(tmp_path)
    assert ids == ["a.jpg"]
    assert len(caplog.records) == 1
    assert "'caf\\udce9.jpg' (the name is not valid UTF-8)" in caplog.records[0].getMessage()
