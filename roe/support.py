"""The supported-families table of `roe models`, discovered live from tiny random models.

For every family in ``roe.families`` a tiny model is built from its transformers config class
and ``roe.roster`` is installed on it: the routers are found, each is self-tested at tau = 0,
and the rule that reproduced it is reported with the decode strategy. Nothing here is a
hand-kept list of what works; a family that fails shows its error.
"""

from __future__ import annotations

import torch

STRATEGY_TEXT = {
    "fold": "clean cache, members folded into one forward; batched scoring",
    "expand": "recurrent/linear state copied to K rows, re-synced to member 0 each step; stepwise scoring",
}


def family_row(name: str) -> dict:
    """One table row: the family's class, MoE layer count, rules and strategy, or its refusal."""
    import roe
    from roe.families import build

    model = build(name)
    row = {"family": name, "class": type(model).__name__}
    try:
        with roe.roster(model, roe.RoEConfig(roster_size=2, tau=0.5, skip_first=0, skip_last=0)) as r:
            rules = list(dict.fromkeys(slot.rule.describe() for slot in r.slots))
            row.update(supported=True, moe_layers=len(r.slots), rules=rules, strategy=r.strategy)
    except (ValueError, TypeError) as err:
        row.update(supported=False, reason=str(err))
    return row


def support_table(progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from roe.families import FAMILIES

    torch.set_num_threads(1)
    names = sorted(FAMILIES)
    return [family_row(n) for n in tqdm(names, disable=not progress, desc="families", leave=False)]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| family | transformers class | routing rule | how RoE runs |", "| --- | --- | --- | --- |"]
    for row in rows:
        if row["supported"]:
            lines.append(f"| {row['family']} | `{row['class']}` | {', '.join(row['rules'])} | "
                         f"{STRATEGY_TEXT[row['strategy']]} |")
        else:
            lines.append(f"| {row['family']} | `{row['class']}` | refused | {row['reason'].split('. ')[0]} |")
    ok = sum(r["supported"] for r in rows)
    lines.append(f"\n{ok} of {len(rows)} families supported.")
    return "\n".join(lines)
