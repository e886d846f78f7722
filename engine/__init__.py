"""pdserve's model runtime: paged KV cache, prefix cache, continuous batching, Llama-family
models, Triton kernels with torch references. Knows nothing of Ray, gRPC or sockets."""
from engine.config import EngineConfig, ModelConfig
from engine.errors import CapacityError, InvalidRequestError, ModelLoadError
from engine.llm import LLM, Output
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "Output", "RequestOutput", "SamplingParams", "EngineConfig", "ModelConfig",
           "InvalidRequestError", "ModelLoadError", "CapacityError"]
