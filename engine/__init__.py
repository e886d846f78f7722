"""pdserve's model runtime: paged KV cache, prefix cache, continuous batching, Llama-family
models, Triton kernels with torch references. Knows nothing of Ray, gRPC or sockets."""
import os

# OpenMP (torch's CPU thread pool, libgomp) lets an idle worker thread spin for ~300k
# iterations, several milliseconds, after each parallel region before it sleeps. On CPU the
# engine runs its decode attention on plain Python threads between two matmuls
# (engine/kernels/cpu_ops.py), and a spinning OpenMP thread then holds the core that
# attention thread needs. A spin of 3000 iterations (~0.1 ms) still bridges the gaps between
# a layer's matmuls (the A/B is benchmarks/cpu_attention_ab.py, figures in
# benchmarks/RESULTS.md). libgomp reads this once,
# when torch loads it, so it only takes effect when this package is imported before torch
# (the pdserve CLI does, and the worker packages' __init__ make the workers do); an operator's
# own value is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from engine.config import EngineConfig, ModelConfig
from engine.errors import CapacityError, InvalidRequestError, ModelLoadError
from engine.llm import LLM, Output
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "Output", "RequestOutput", "SamplingParams", "EngineConfig", "ModelConfig",
           "InvalidRequestError", "ModelLoadError", "CapacityError"]
