"""nanoseek: train, customise and serve DeepSeek-V3-architecture language models on modest hardware."""

from nanoseek.config import ConfigError, ModelConfig, preset
from nanoseek.model import CheckpointError, ModelOutput, NanoSeek, load_pretrained, save_pretrained

__version__ = "0.1.0"


def from_pretrained(path: str, **kwargs) -> NanoSeek:
    """Load a model from an HF `deepseek_v3` folder or a nanoseek checkpoint (same layout)."""
    return load_pretrained(path, **kwargs)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "ModelOutput",
    "NanoSeek",
    "__version__",
    "from_pretrained",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
