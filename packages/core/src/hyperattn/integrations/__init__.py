"""Integrations of HyperAttention into other libraries.

* :mod:`hyperattn.integrations.transformers`: ``attn_implementation="hyper"`` for Hugging Face
  transformers models (``register()`` first: importing registers nothing).

Each integration is imported on its own (this package imports none of them), so that
``import hyperattn`` never imports the libraries they integrate with.
"""
