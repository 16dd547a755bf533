"""The torch side of hyperattn: the autograd bridge (``autograd.py``), the ``torch.library``
operators that ``torch.compile`` sees (``op.py``, with ``masks.py`` for masked calls and
``arguments.py`` for their plain-value inputs), the ``HyperAttention`` module (``module.py``) and
the inputs as ``torch.autocast`` casts them (``autocast.py``, which every entry point calls).

Imported lazily (only when torch tensors need gradients, or the module is asked for), and never
importing the API back.
"""
