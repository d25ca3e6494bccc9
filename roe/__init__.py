"""roe: Roster-of-Experts inference for transformers Mixture-of-Experts language models.

    import roe
    model, tokenizer = roe.load()
    with roe.roster(model, roe.RoEConfig(roster_size=8, tau=0.1)) as r:
        ids = r.generate(input_ids, max_new_tokens=64)
"""

from roe.config import RoEConfig
from roe.loading import load
from roe.roster import Roster, roster
from roe.schedule import Schedule

__all__ = ["RoEConfig", "Roster", "Schedule", "load", "roster"]
__version__ = "0.1.0"
