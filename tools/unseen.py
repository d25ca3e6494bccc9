"""English text the default model never saw, for measuring RoE out of distribution.

    python -m tools.unseen --out data/unseen.txt

Sources (Debian packages, not in the training corpus; extracted without installing):

- ``debian-reference-en``: the Debian Reference (Osamu Aoki), plain-text edition; GPL-2+.
- ``doc-debian``: the Debian Constitution, Social Contract and Manifesto; GPL / Open Publication
  License (see the packages' copyright files).

The table of contents, tables and lines that are mostly symbols are dropped; paragraphs are
kept as running text. Documents are separated by two blank lines (the format ``roe eval
--text`` and ``roe tasks --text`` read). The cleaned text is written to ``--out``; nothing here
is used for training or tuning.
"""

from __future__ import annotations

import argparse
import gzip
import re
from pathlib import Path

from tools.corpus import _debian_package, _tidy

LICENCES = {"debian-reference-en": "GPL-2+", "doc-debian": "GPL-2+ / Open Publication License v1.0"}
DOC_DEBIAN_FILES = ("constitution.txt.gz", "social-contract.txt.gz", "debian-manifesto.gz")
_TOC = re.compile(r"^\s*(\d+\.)+\d*\.?\s+\S")


def _prose_lines(text: str) -> str:
    """Drop table-of-contents entries, table rows and symbol-heavy lines; keep paragraphs."""
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        letters = sum(ch.isalpha() for ch in stripped)
        if _TOC.match(line) and len(stripped) < 80:
            continue
        if stripped and (letters < 0.6 * len(stripped) or "|" in stripped or "+---" in stripped):
            continue
        kept.append(stripped)
    return _tidy("\n".join(kept))


def build(out: Path, cache: Path) -> dict[str, int]:
    """Write the unseen-English file; return characters per source."""
    reference = _debian_package("debian-reference-en", "debian_reference", cache)
    docs = {"debian_reference": _prose_lines(gzip.decompress(
        (reference / "usr/share/debian-reference/debian-reference.en.txt.gz").read_bytes()).decode())}
    doc_debian = _debian_package("doc-debian", "doc_debian", cache)
    for name in DOC_DEBIAN_FILES:
        raw = gzip.decompress((doc_debian / "usr/share/doc/debian" / name).read_bytes()).decode(errors="replace")
        docs[name.split(".")[0]] = _prose_lines(raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n\n".join(docs.values()) + "\n")
    return {name: len(text) for name, text in docs.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/unseen.txt"))
    ap.add_argument("--cache", type=Path, default=Path("data/cache"), help="where downloaded packages are kept")
    args = ap.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    sizes = build(args.out, args.cache.resolve())
    for name, chars in sizes.items():
        print(f"{name:18s} {chars:>9,d} characters")
    print(f"wrote {args.out} ({sum(sizes.values()):,d} characters); licences: {LICENCES}")


if __name__ == "__main__":
    main()
