"""The per-model analysis is done once; rosters are cheap; the core modules import one way (issue 18).

The story: every ``roe.roster(...)`` used to find and self-test the routers (a probe forward and
one self-test per rule variant), probe the fan-out point (six forwards) and pack the head, and
the server built a roster for every new setting of a batch; ``roe.engine`` and ``roe.roster``
imported each other.
"""

import ast
from pathlib import Path

import pytest
import torch

import roe
from roe import adapters
from roe.serve.protocol import Sampling, ServeConfig
from roe.serve.worker import Job, Worker
from tests.conftest import tiny_olmoe, tiny_tokenizer
from tests.test_worker import Sink

pytestmark = pytest.mark.usefixtures("one_thread")

# skip_first=1: the first noisy router is in layer 1, so decode steps fan out there (probed once)
FAN_OUT = dict(tau=1.5, skip_first=1, skip_last=0)


class Counts:
    """Model forwards and router probes, counted from the moment it is made."""

    def __init__(self, model, monkeypatch) -> None:
        self.forwards = self.probes = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        probe = adapters.probe

        def counted(*args, **kwargs):
            self.probes += 1
            return probe(*args, **kwargs)

        monkeypatch.setattr(adapters, "probe", counted)


def test_a_second_roster_for_the_same_model_does_not_redo_the_analysis(monkeypatch):
    """Another roster on the same model (other roster size, temperatures, seed) runs no forward to
    be built, and its generation runs exactly the prefill and one forward per step: the routers'
    self-test and the fan-out probes are the model's, done by the first roster."""
    model, prompt_ids = tiny_olmoe(), torch.tensor([[5, 6, 7, 8, 9]])
    model.generation_config.eos_token_id = None  # every generation runs its 3 steps
    counts = Counts(model, monkeypatch)
    with roe.roster(model, roe.RoEConfig(roster_size=4, seed=1, **FAN_OUT)) as r:
        first = r.generate(prompt_ids, max_new_tokens=3)
        assert r.fan_out_point is not None
    assert counts.probes == 1
    counts.forwards = counts.probes = 0
    cfg = roe.RoEConfig(roster_size=3, seed=2, **{**FAN_OUT, "tau": 0.7})
    r = roe.roster(model, cfg)
    assert (counts.forwards, counts.probes) == (0, 0)
    second = r.generate(prompt_ids, max_new_tokens=3)
    assert (counts.forwards, counts.probes) == (1 + 3, 0)  # the prefill, then 3 decode steps
    with roe.roster(model, roe.RoEConfig(roster_size=4, seed=1, **FAN_OUT)) as again:
        assert torch.equal(again.generate(prompt_ids, max_new_tokens=3), first)
    assert second.shape == first.shape and counts.probes == 0


def test_the_analysis_is_redone_when_the_routers_are_other_modules(monkeypatch):
    """Keyed on the model and checked against its routers: replacing a router module (model
    surgery) is seen, and the new router is analysed."""
    model = tiny_olmoe()
    counts = Counts(model, monkeypatch)
    roe.roster(model, roe.RoEConfig(roster_size=2))
    block = model.model.layers[1].mlp
    block.gate = type(block.gate)(model.config)
    block.gate.load_state_dict(model.model.layers[0].mlp.gate.state_dict())
    with roe.roster(model, roe.RoEConfig(roster_size=2)) as r:
        assert r.slots[1].module is block.gate
    assert counts.probes == 2


def test_the_cached_analysis_does_not_keep_its_model_alive():
    """The cache is keyed on the model; an analysis holding its model strongly would keep every
    model a roster was ever built on in memory (a server reloading models, a sweep over checkpoints)."""
    import gc
    import weakref

    from roe.analysis import analyse

    model = tiny_olmoe()
    with roe.roster(model, roe.RoEConfig(roster_size=2, **FAN_OUT)) as r:
        r.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)  # fan-out probed, kernels packed
    assert analyse(model).fan_out(1) is not None
    alive = weakref.ref(model)
    del model, r
    gc.collect()
    assert alive() is None


def test_the_server_does_not_analyse_the_model_per_batch(monkeypatch):
    """Batches with settings the worker has not seen before (roster sizes, temperatures) start
    groups of their own; none of them probes the routers or the fan-out point again: each group
    costs its prefill and one forward per step."""
    model = tiny_olmoe()
    model.generation_config.eos_token_id = None
    worker = Worker(model, tiny_tokenizer(), ServeConfig(max_batch=4, threads=1), pad_id=0)
    worker.start()
    try:
        settings = [dict(roster_size=2), dict(roster_size=3), dict(roster_size=4, tau=0.4), dict(roster_size=5)]
        counts = None
        for i, one in enumerate(settings):
            cfg = roe.RoEConfig(seed=i, **{**FAN_OUT, **one})
            job = Job((), cfg, Sampling(False, 1.0, 1.0, ()), [5, 6, 7], 4, 0, Sink())
            worker.submit([job])
            assert job.emit.done.wait(120) and job.emit.events[-1][0] == "end"
            if counts is None:  # the first batch analyses the model
                counts = Counts(model, monkeypatch)
        assert counts.probes == 0
        assert counts.forwards == 3 * (1 + 4)  # three batches: a prefill and 4 steps each
        assert worker.batches == 4
    finally:
        worker.close(timeout=120)


def test_the_moe_layers_are_counted_one_way():
    """Calibration's count is the analysis's, which is the routers a roster's schedule covers."""
    from roe.analysis import analyse, num_moe_layers
    from roe.calibrate import num_moe_layers as calibrate_count

    model = tiny_olmoe(num_hidden_layers=4)
    with roe.roster(model, roe.RoEConfig(roster_size=2)) as r:
        assert calibrate_count(model) == num_moe_layers(model) == analyse(model).moe_layers == len(r.tau_L) == 4


# The core, bottom to top: a module may import only modules before it (also inside functions).
LAYERS = ["roe.routing", "roe.schedule", "roe.aggregate", "roe.config", "roe.cache", "roe.kernels", "roe.adapters",
          "roe.patch", "roe.analysis", "roe.members", "roe.engine", "roe.roster"]


def _imports(module: str) -> set[str]:
    """Every roe module ``module`` imports, at module level or inside a function."""
    root = Path(roe.__file__).parent.parent
    path = root / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = root / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {name for name in names for layer in LAYERS if name == layer or name.startswith(layer + ".")}
    return {next(layer for layer in LAYERS if name == layer or name.startswith(layer + ".")) for name in found}


@pytest.mark.parametrize("module", LAYERS)
def test_the_core_modules_import_one_way(module):
    """No import cycle: the roster builds on the decoders, the decoders on the member forwards,
    those on the model analysis and the router patch (roe.engine and roe.roster used to import
    each other)."""
    later = set(LAYERS[LAYERS.index(module) + 1:])
    assert not (_imports(module) & later), (module, sorted(_imports(module) & later))
