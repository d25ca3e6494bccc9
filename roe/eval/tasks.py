"""Built-in accuracy tasks from a held-out text file: next-line choice and last-word completion.

next-line (multiple choice, scored like lm-eval's loglikelihood tasks): context = the previous
lines of a document (at most ``context_tokens`` tokens), candidates = the true next line and 3
lines drawn (seeded) from elsewhere in the file; each candidate's score is the summed
log-likelihood of its tokens given the context; correct when the true line scores highest.

last-word (generation): context = a passage ending right before the final word (>= 4 letters)
of a line; greedy generation of a few tokens; correct when the first generated word, stripped of
punctuation, equals the true word.

Both run through ``Roster`` (K = 1 is the untouched model), on the same items for base and RoE,
so the comparison is paired (McNemar counts). ``export_lm_eval`` writes the items and lm-eval
task YAMLs so lm-eval reproduces the same numbers.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LINE_MIN_CHARS = 20
CONTEXT_LINES = 8
WORD_RE = re.compile(r"[ \t]*([A-Za-z]+)")  # as the lm-eval filter: a newline ends the answer
LAST_WORD_RE = re.compile(r"^(.*\S)\s+([A-Za-z]{4,})[^\w\s]*$")


@dataclass(frozen=True, kw_only=True)
class ChoiceItem:
    context: str
    choices: list[str]
    answer: int


@dataclass(frozen=True, kw_only=True)
class WordItem:
    context: str
    answer: str


def read_documents(path) -> list[list[str]]:
    """Documents (separated by two blank lines) as lists of their non-empty lines of >= 20 chars."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    docs = raw.decode("utf-8", errors="replace").split("\n\n\n")
    return [[ln.strip() for ln in d.splitlines() if len(ln.strip()) >= LINE_MIN_CHARS] for d in docs]


def _tail(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[-max_tokens:])


def _places(docs: list[list[str]], seed: int) -> list[tuple[int, int]]:
    """(document, line) places with at least one previous line, in a seeded random order."""
    places = [(d, i) for d, lines in enumerate(docs) for i in range(1, len(lines))]
    random.Random(seed).shuffle(places)
    return places


def next_line_items(docs, tokenizer, n: int, seed: int = 0, context_tokens: int = 200) -> list[ChoiceItem]:
    rng = random.Random(seed + 1)
    pool = [(d, i) for d, lines in enumerate(docs) for i in range(len(lines))]
    items = []
    for d, i in _places(docs, seed)[:n]:
        true = docs[d][i]
        others = [docs[od][oi] for od, oi in rng.sample(pool, min(len(pool), 12)) if docs[od][oi] != true]
        distractors = list(dict.fromkeys(others))[:3]
        if len(distractors) < 3:
            continue
        answer = rng.randrange(4)
        choices = distractors[:answer] + [true] + distractors[answer:]
        context = _tail(tokenizer, "\n".join(docs[d][max(0, i - CONTEXT_LINES) : i]) + "\n", context_tokens)
        items.append(ChoiceItem(context=context, choices=choices, answer=answer))
    return items


def last_word_items(docs, tokenizer, n: int, seed: int = 0, context_tokens: int = 200) -> list[WordItem]:
    items = []
    for d, i in _places(docs, seed):
        match = LAST_WORD_RE.match(docs[d][i])
        if match is None:
            continue
        passage = "\n".join(docs[d][max(0, i - CONTEXT_LINES) : i] + [match.group(1)])
        items.append(WordItem(context=_tail(tokenizer, passage, context_tokens), answer=match.group(2)))
        if len(items) == n:
            break
    return items


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context whitespace moves to the continuation; tokens of the whole."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer(stripped, add_special_tokens=False).input_ids
    whole = tokenizer(stripped + continuation, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def choice_scores(r, tokenizer, item: ChoiceItem) -> list[float]:
    """Summed log-likelihood of each candidate's tokens given the context, under roster ``r``."""
    pairs = [encode_pair(tokenizer, item.context, c) for c in item.choices]
    ids_BS, mask_BS = _left_pad([ctx + cont for ctx, cont in pairs], tokenizer.pad_token_id or 0)
    logprobs_BSV = r.score(ids_BS, mask_BS)
    scores = []
    for b, (_, cont) in enumerate(pairs):
        targets = ids_BS[b, -len(cont):]
        scores.append(float(logprobs_BSV[b, -len(cont) - 1 : -1].gather(-1, targets[:, None]).sum()))
    return scores


def first_word(text: str) -> str:
    match = WORD_RE.match(text)
    return match.group(1) if match else ""


@torch.no_grad()
def generated_words(r, tokenizer, items: list[WordItem], max_new_tokens: int = 6) -> list[str]:
    rows = [tokenizer(it.context, add_special_tokens=False).input_ids for it in items]
    ids_BS, mask_BS = _left_pad(rows, tokenizer.pad_token_id or 0)
    out = r.generate(ids_BS, mask_BS, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    return [first_word(t) for t in tokenizer.batch_decode(out[:, ids_BS.shape[1]:], skip_special_tokens=True)]


def correct(model, tokenizer, task: str, items: list, cfg, batch_size: int = 8, progress=None) -> list[bool]:
    """Per-item correctness of a roster with ``cfg`` (roster_size=1: the untouched model)."""
    from roe.roster import roster

    right = []
    with roster(model, cfg) as r:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if task == "next-line":
                right += [max(range(4), key=choice_scores(r, tokenizer, it).__getitem__) == it.answer for it in chunk]
            else:
                right += [w == it.answer for w, it in zip(generated_words(r, tokenizer, chunk), chunk, strict=True)]
            if progress is not None:
                progress.update(len(chunk))
    return right


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def mcnemar(base: list[bool], ours: list[bool]) -> dict:
    """Paired counts and the exact two-sided McNemar p-value (binomial test on discordant pairs)."""
    both = sum(a and b for a, b in zip(base, ours, strict=True))
    base_only = sum(a and not b for a, b in zip(base, ours, strict=True))
    roe_only = sum(b and not a for a, b in zip(base, ours, strict=True))
    neither = len(base) - both - base_only - roe_only
    n, k = base_only + roe_only, min(base_only, roe_only)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"both_right": both, "base_only": base_only, "roe_only": roe_only, "both_wrong": neither, "p_value": p}


def export_lm_eval(directory, next_line: list[ChoiceItem], last_word: list[WordItem]) -> list[Path]:
    """Items as JSONL plus lm-eval task YAMLs (roe_next_line: multiple_choice; roe_last_word: generate_until)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, items, body in (("roe_next_line", next_line, _NEXT_LINE_YAML), ("roe_last_word", last_word,
                                                                              _LAST_WORD_YAML)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(asdict(it)) + "\n" for it in items))
        yaml = directory / f"{name}.yaml"
        yaml.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                        f"    test: {json.dumps(str(data.resolve()))}\ntest_split: test\n{body}")
        written += [data, yaml]
    return written


_NEXT_LINE_YAML = """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_LAST_WORD_YAML = """output_type: generate_until
doc_to_text: context
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: '^[ \\t]*([A-Za-z]+)'
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
