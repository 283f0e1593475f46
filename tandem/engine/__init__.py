"""Generation: paged KV cache, continuous-batching engine, sampler, incremental detokenizer."""

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.kv_cache import KVCache
from tandem.engine.sampling import SamplingParams
from tandem.engine.sequence import Sequence

__all__ = ["Engine", "EngineConfig", "KVCache", "SamplingParams", "Sequence"]
