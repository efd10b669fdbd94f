"""opengpt: an open, readable GPT-4-style stack. The public face: LLM, ModelConfig."""

from .api import LLM
from .config import ModelConfig

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "__version__"]
