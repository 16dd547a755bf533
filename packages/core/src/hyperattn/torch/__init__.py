"""The torch side of hyperattn: the autograd bridge and the ``HyperAttention`` module.

Imported lazily (only when torch tensors need gradients, or the module is asked for), and never
importing the API back.
"""
