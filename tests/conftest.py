"""Tiny random MoE models built from transformers config classes; nothing is downloaded."""

import json

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def tiny_olmoe(**overrides):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    params = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=32, num_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                  eos_token_id=1, pad_token_id=0, bos_token_id=0)
    params.update(overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(OlmoeConfig(**params)).eval()


@pytest.fixture(scope="session")
def olmoe():
    return tiny_olmoe()


@pytest.fixture
def prompt_ids():
    return torch.randint(2, 128, (1, 9), generator=torch.Generator().manual_seed(7))


def tiny_tokenizer():
    """A byte-level BPE trained in milliseconds on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["To be, or not to be, that is the question.", "In the beginning was the word.",
            "The quick brown fox jumps over the lazy dog."] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """A tiny OLMoE and its tokenizer saved to disk, as a user's checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny-olmoe")
    tokenizer = tiny_tokenizer()
    model = tiny_olmoe(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens_dir(tmp_path_factory, saved_model):
    """train.bin and validation.bin of random ids in ``saved_model``'s vocabulary, as tools/tokenizer.py writes them."""
    vocab = json.loads((saved_model / "config.json").read_text())["vocab_size"]
    path = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, 4000).astype(np.uint16).tofile(path / "train.bin")
    rng.integers(0, vocab, 400).astype(np.uint16).tofile(path / "validation.bin")
    return path


def refused(argv: list[str], capsys) -> str:
    """``roe`` with ``argv`` exits with status 2 (a usage error, no traceback); returns its stderr."""
    from roe import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def turn_decode_kernels_off(monkeypatch) -> None:
    """Decode steps without roe's CPU kernels (roe/kernels.py), as where none applies: the model
    analysis finds neither a packed head nor the small-M kernel, so every product is the model's own."""
    from roe.analysis import ModelAnalysis

    monkeypatch.setattr(ModelAnalysis, "head", lambda self: None)
    monkeypatch.setattr(ModelAnalysis, "small_m", lambda self: None)


@pytest.fixture(autouse=True)
def decode_kernels_off(monkeypatch):
    """Every test runs with the decode kernels off, so that no test outside the kernels' own modules
    depends on them or their rounding. tests/test_kernels*.py override this fixture (kernels on),
    hold the kernels to ``F.linear`` and rerun there the tests of K = 1 against the plain model and
    of decoding against the slow reference.
    """
    turn_decode_kernels_off(monkeypatch)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is far faster than two on a busy 2-core machine.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_m_or_skip():
    """The small-M kernel's module, built if needed; a skip only where it cannot exist (no AVX2, no compiler)."""
    import shutil

    from torch.utils.cpp_extension import is_ninja_available

    from roe.kernels import SmallM

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the small-M kernel needs AVX2")
    if shutil.which("c++") is None or not is_ninja_available():
        pytest.skip("the small-M kernel is compiled on first use: needs a C++ compiler and ninja")
    extension = SmallM.extension()
    assert extension is not None, "AVX2 is present but the small-M kernel did not build (see stderr)"
    return extension
