"""The serving half of tidal: the engine, the offline LLM API and the asynchronous engine."""

from tidal.serve.engine import EngineConfig, LLMEngine
from tidal.serve.llm import LLM
from tidal.serve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tidal.serve.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams"]
