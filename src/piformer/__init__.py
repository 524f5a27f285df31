"""piformer: language models for private inference.

Build the architectures of "Entropy-Guided Attention for Private LLMs" (Jha & Reagen, 2025),
train them, measure attention entropy, and price them under two-party secure inference.
"""

from .config import ModelConfig, RegLoss, TrainConfig
from .model import ModelOutput, PiGPT

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TrainConfig", "RegLoss", "PiGPT", "ModelOutput", "__version__"]
