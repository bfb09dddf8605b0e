"""Real-model forward passes in numpy, to see what quantization does to outputs.

``SentenceEncoder`` (all-MiniLM-L6-v2 and other BERT sentence encoders)
imports ``tokenizers`` only when it is used.
"""

from .causal_lm import CausalLM
from .sentence_encoder import SentenceEncoder

__all__ = ["SentenceEncoder", "CausalLM"]
