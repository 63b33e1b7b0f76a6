"""Integrations of tfkernels with other libraries.

- tfkernels.integrations.huggingface: an attention backend for Hugging Face
  transformers, registered as attn_implementation="tfkernels" on import.

Each integration is imported on demand; the libraries they serve are optional.
"""
