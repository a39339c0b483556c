"""Inference: the latent-KV-cache forward, sampling, streamed text and the continuous-batching engine."""

from nanoseek.infer.engine import Engine, EngineStopped, QueueFull, TokenEvent, load_for_inference
from nanoseek.infer.forward import LatentCache
from nanoseek.infer.sampling import InferenceError, SamplingParams

__all__ = ["Engine", "EngineStopped", "InferenceError", "LatentCache", "QueueFull", "SamplingParams", "TokenEvent",
           "load_for_inference"]
