"""Modules built on the fused ops, with the parameters of the PyTorch blocks they replace.

- FusedQKV:      nn.Linear(E, (H + 2*Hkv) * D) followed by the head split.
- SelfAttention: nn.MultiheadAttention (batch_first, self-attention), same state_dict keys.
- FusedMLP:      Linear -> GELU -> Linear, keys linear1/linear2 as in nn.TransformerEncoderLayer.
- TransformerEncoderLayer: nn.TransformerEncoderLayer's constructor, state_dict and forward.
- convert(model): swaps every nn.TransformerEncoderLayer in a model for the fused one, in place.

One file each: modules.py (the first three), encoder_layer.py, conversion.py.
"""
from .conversion import ConvertReport, convert
from .encoder_layer import TransformerEncoderLayer
from .modules import FusedMLP, FusedQKV, SelfAttention

__all__ = ["FusedQKV", "SelfAttention", "FusedMLP", "TransformerEncoderLayer", "convert", "ConvertReport"]
