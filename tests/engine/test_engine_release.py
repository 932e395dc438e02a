"""A dropped engine gives its memory back at once: its model's weights (fused copies of the
checkpoint's) and its KV pool are freed by reference counting, not left for the cyclic
collector. The suite creates engines by the dozen; held until a full collection they took
the test process past 14 GB."""

from __future__ import annotations

import gc
import weakref

from pdserve.engine.sampling_params import SamplingParams


def test_a_dropped_engine_frees_its_model_and_kv_pool_without_the_cyclic_collector(make_engine):
    gc.disable()
    try:
        eng = make_engine(kv_cache_bytes=1 << 24)
        eng.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0.0, max_tokens=2))
        model, pool = weakref.ref(eng.runner.model), weakref.ref(eng.runner.kv_pool)
        del eng
        assert model() is None and pool() is None
    finally:
        gc.enable()
