"""The DeepSeek-V3 model: MLA attention, DeepSeekMoE, Multi-Token Prediction, and its HF checkpoint layout."""

from nanoseek.model.hf import CheckpointError, load_pretrained, save_pretrained
from nanoseek.model.model import IGNORE_INDEX, ModelOutput, NanoSeek

__all__ = ["IGNORE_INDEX", "CheckpointError", "ModelOutput", "NanoSeek", "load_pretrained", "save_pretrained"]
