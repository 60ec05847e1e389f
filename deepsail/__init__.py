"""deepsail: a PyTorch toolkit for DeepSeek-style language models."""

__version__ = "0.1.0"
