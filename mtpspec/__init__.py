"""mtpspec: lossless speculative decoding with MTP drafters on CPU (PyTorch)."""

__version__ = "0.1.0"
