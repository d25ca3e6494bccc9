"""``roe phds`` on a ``tools.train`` checkpoint file (ckpt.pt): the equivalent-size family's members.

    python -m tools.finetune --model runs/family/d256/ckpt.pt --routing-tau 0.1 --steps 130 --out DIR

The options are ``roe phds``'s. The installed package reads checkpoint directories only and never
imports tools/; this entry point installs ``tools.train.read_checkpoint`` as ``roe.phds.FILE_READER``,
so ``--model`` may be a ckpt.pt, which is rebuilt with ``tools.train.build_model`` and read with the
embedded tokenizer. The fine-tuned model is then written as a checkpoint directory and also as
``DIR/ckpt.pt`` in the tools.train format (``roe.phds.save_train_checkpoint``), so
``benchmarks/equivalent_size.py evaluate`` reads it as a member. Run from the repository root.
"""

from __future__ import annotations

import sys

from roe import phds
from roe.cli import main as roe_main
from tools.train import read_checkpoint


def main(argv: list[str] | None = None) -> None:
    phds.FILE_READER = read_checkpoint
    roe_main(["phds", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
