"""Train the roe byte-level BPE tokenizer on the corpus and encode the corpus splits.

    python -m tools.tokenizer --corpus data/corpus --vocab-size 8192 --out data/tokenizer
    python -m tools.tokenizer --corpus data/corpus --out data/tokenizer --encode [--tokens data/tokens]

The tokenizer is a GPT-2 style byte-level BPE trained on ``CORPUS/train.txt`` only, with one
special token ``<|endoftext|>`` (id 0) used as eos, bos and pad; it is saved as a
``transformers.PreTrainedTokenizerFast`` (loadable with ``AutoTokenizer.from_pretrained``).
No special tokens are added on encoding.

``--encode`` writes ``TOKENS/{train,validation,test}.bin`` (flat uint16 arrays: every document
followed by one eos token) and ``TOKENS/meta.json`` with per split the token count and the
number of UTF-8 bytes of the documents (for bits per byte: bpb = nll_nats_total / ln 2 / bytes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from roe.tokens import TOKEN_DTYPE
from tools.corpus import DOC_SEP, SPLITS

EOS = "<|endoftext|>"


def train_tokenizer(train_file: Path, vocab_size: int = 8192):
    """Train a byte-level BPE on one text file and wrap it as a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(train_file)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def read_docs(path: Path) -> list[str]:
    """Documents of a corpus split file (separated by DOC_SEP)."""
    text = Path(path).read_text(encoding="utf-8").strip("\n")
    return [d for d in text.split(DOC_SEP) if d] if text else []


def encode_file(tokenizer, path: Path, batch_docs: int = 256) -> np.ndarray:
    """Encode a corpus split file fast (encode_batch over documents), eos after every document.

    ``tokenizer`` is a PreTrainedTokenizerFast or a raw ``tokenizers.Tokenizer``.
    Returns uint16 ids if the vocabulary fits, else int32.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    eos_id = backend.token_to_id(EOS)
    dtype = np.uint16 if backend.get_vocab_size() <= 65536 else np.int32
    docs = read_docs(path)
    parts = []
    for i in range(0, len(docs), batch_docs):
        for enc in backend.encode_batch(docs[i : i + batch_docs], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos_id], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def encode_corpus(tokenizer, corpus: Path, out: Path) -> dict:
    """Write OUT/<split>.bin for the combined splits; return token/byte counts (also per source)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"dtype": "uint16", "eos_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer),
            "bytes_definition": "UTF-8 bytes of the documents (without separators)", "splits": {}, "sources": {}}
    for split in SPLITS:
        t0 = time.time()
        ids = encode_file(tokenizer, corpus / f"{split}.txt")
        ids.astype(TOKEN_DTYPE).tofile(out / f"{split}.bin")
        nbytes = sum(len(d.encode()) for d in read_docs(corpus / f"{split}.txt"))
        meta["splits"][split] = {"tokens": int(ids.size), "bytes": nbytes, "bytes_per_token": nbytes / max(1, ids.size)}
        print(f"{split:10s} {ids.size:>10,d} tokens  {nbytes:>11,d} bytes  {nbytes / max(1, ids.size):.3f} bytes/token"
              f"  ({time.time() - t0:.1f} s)", flush=True)
    for src_dir in sorted(p for p in corpus.iterdir() if p.is_dir() and not p.name.startswith("_")):
        meta["sources"][src_dir.name] = {}
        for split in SPLITS:
            ids = encode_file(tokenizer, src_dir / f"{split}.txt")
            nbytes = sum(len(d.encode()) for d in read_docs(src_dir / f"{split}.txt"))
            meta["sources"][src_dir.name][split] = {"tokens": int(ids.size), "bytes": nbytes}
        print(f"  {src_dir.name:12s} " + "  ".join(
            f"{s} {v['tokens']:>9,d} tok {v['bytes'] / max(1, v['tokens']):.2f} B/tok"
            for s, v in meta["sources"][src_dir.name].items()), flush=True)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path("data/tokenizer"))
    ap.add_argument("--encode", action="store_true", help="also write the token .bin files")
    ap.add_argument("--tokens", type=Path, default=None, help="output dir for --encode (default: <corpus>/../tokens)")
    ap.add_argument("--existing", type=Path, default=None,
                    help="encode with this saved tokenizer (e.g. roe/assets/default) instead of training one")
    args = ap.parse_args(argv)

    t0 = time.time()
    if args.existing is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(args.existing))
        print(f"using the tokenizer in {args.existing} (vocab {len(tokenizer)})", flush=True)
    else:
        tokenizer = train_tokenizer(args.corpus / "train.txt", args.vocab_size)
        print(f"trained BPE vocab {len(tokenizer)} in {time.time() - t0:.1f} s -> {args.out}", flush=True)
    tokenizer.save_pretrained(str(args.out))
    if args.encode:
        encode_corpus(tokenizer, args.corpus, args.tokens or args.corpus.parent / "tokens")


if __name__ == "__main__":
    main()
