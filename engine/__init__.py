"""pdserve's model runtime: paged KV cache, prefix cache, continuous batching, Llama-family
models, Triton kernels with torch references. Knows nothing of Ray, gRPC or sockets."""
import os

# OpenMP (torch's CPU thread pool, libgomp) lets an idle worker thread spin for ~300k
# iterations, several milliseconds, after each parallel region before it sleeps. On CPU the
# engine runs its decode attention on plain Python threads between two matmuls
# (engine/kernels/cpu_ops.py), and a spinning OpenMP thread then holds the core that
# attention thread needs: measured on 2 cores, SmolLM2 at batch 32, attention took 21 s of
# the run with the default and 13 s with a spin of 3000 iterations (~0.1 ms, still enough to
# bridge the gaps between a layer's matmuls: batch 1 unchanged). libgomp reads this once,
# when torch loads it, so it only takes effect when this package is imported before torch
# (the pdserve CLI does, and decode_worker/__init__.py makes the workers do); an operator's
# own value is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from engine.config import EngineConfig, ModelConfig
from engine.errors import CapacityError, InvalidRequestError, ModelLoadError
from engine.llm import LLM, Output
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "Output", "RequestOutput", "SamplingParams", "EngineConfig", "ModelConfig",
           "InvalidRequestError", "ModelLoadError", "CapacityError"]
