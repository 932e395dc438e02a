"""Session fixtures for engine tests: the default model loaded once, engines built on it, and
Hugging Face transformers on the same GGUF as the correctness oracle."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.engine_config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.model.loader import Checkpoint, default_model_path, load_checkpoint

PASSAGES = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined a screw press with movable metal type.",
    "Photosynthesis converts light energy into chemical energy; plants, algae and some bacteria "
    "store it as sugars built from carbon dioxide and water.",
    "In distributed systems, consensus protocols such as Raft and Paxos let a group of machines "
    "agree on a sequence of values even when some of them fail.",
    "The Pacific Ocean covers about a third of the surface of the Earth and contains the Mariana "
    "Trench, the deepest known point in the oceans.",
    "A compiler translates source code into machine code in stages: lexing, parsing, semantic "
    "analysis, optimisation and code generation.",
    "Mozart wrote more than six hundred works, including symphonies, concertos, chamber music "
    "and operas such as The Magic Flute.",
]


@pytest.fixture(scope="session")
def checkpoint() -> Checkpoint:
    return load_checkpoint(None, dtype=torch.float32)


@pytest.fixture(scope="session")
def make_engine(checkpoint):
    def make(**overrides) -> LLMEngine:
        # The exact path (dense fp32 weights, token for token equal to HF) unless a test asks
        # for a quantized one.
        overrides.setdefault("quantization", "none")
        return LLMEngine(EngineConfig(**overrides), checkpoint=checkpoint)

    return make


@pytest.fixture(scope="session")
def engine(make_engine) -> LLMEngine:
    return make_engine(max_num_batched_tokens=256)


@pytest.fixture(scope="session")
def long_text_ids(checkpoint) -> list[int]:
    """About 1,400 tokens of varied prose."""
    text = " ".join(f"{p} ({i})" for i in range(8) for p in PASSAGES)
    return checkpoint.tokenizer.encode(text)


@pytest.fixture(scope="session")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()
