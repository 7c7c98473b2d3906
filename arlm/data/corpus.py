"""Bundled pretraining corpora.

The only corpus shipped with the package is the King James Version of the Bible
(``kjv``), a public-domain English text of about 4.1 MB, stored xz-compressed
as package data so that pretraining works fully offline.

Example::

    from arlm.data.corpus import load_corpus
    text = load_corpus("kjv")   # str, ~4.1M characters (pure ASCII)
"""

from __future__ import annotations

import functools
import importlib.resources
import lzma

__all__ = ["CORPUS_SOURCE", "AVAILABLE_CORPORA", "load_corpus"]

CORPUS_SOURCE: dict[str, str] = {
    "kjv": (
        "King James Version of the Bible (public domain). "
        "Extracted from the Debian package `bible-kjv-text` with the `bible` "
        "command-line tool (Debian package `bible-kjv`): one verse per line, "
        "verse references stripped, chapters separated by a blank line, "
        "books in canonical order (Genesis .. Revelation). "
        "Stored as arlm/data/corpus/kjv.txt.xz; ~4.1 MB UTF-8 uncompressed."
    ),
}
"""Provenance of every bundled corpus, keyed by corpus name."""

_CORPUS_FILES: dict[str, str] = {
    "kjv": "kjv.txt.xz",
}

AVAILABLE_CORPORA: tuple[str, ...] = tuple(sorted(_CORPUS_FILES))
"""Names accepted by :func:`load_corpus`."""


def load_corpus(name: str = "kjv") -> str:
    """Returns the full text of a bundled corpus.

    The text is read from package data (``importlib.resources``), decompressed
    with :mod:`lzma` and decoded as UTF-8. The result is cached, so repeated
    calls are free.

    Args:
      name: Corpus name; one of :data:`AVAILABLE_CORPORA`.

    Returns:
      The corpus as a single string (lines separated by ``"\\n"``).

    Raises:
      ValueError: If ``name`` is not a bundled corpus.
    """
    if name not in _CORPUS_FILES:
        raise ValueError(
            f"Unknown corpus {name!r}; available corpora: {list(AVAILABLE_CORPORA)}."
        )
    return _load_cached(name)


@functools.lru_cache(maxsize=None)
def _load_cached(name: str) -> str:
    """Reads and decompresses a bundled corpus (cached per name)."""
    resource = importlib.resources.files("arlm.data").joinpath("corpus", _CORPUS_FILES[name])
    raw = resource.read_bytes()
    return lzma.decompress(raw).decode("utf-8")
