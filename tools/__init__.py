"""The research pipeline behind the embedded default model; not part of the installed package.

Run from the repository root: ``python -m tools.corpus`` (the offline corpus), ``tools.tokenizer``
(BPE and the token files), ``tools.train`` (training), ``tools.ship`` (the weights and model card
into roe/assets/default), ``tools.unseen`` (out-of-distribution English). The recipe in order is
in roe/assets/default/MODEL_CARD.md. pyproject's package discovery includes ``roe*`` only, so
``pip install`` leaves this directory out; what `roe phds` needs at run time lives in roe/tokens.py.
"""
