"""The Triton kernels, by subject: ``attention`` (forward, dQ, dK/dV), ``lsh`` (hashing),
``sort`` (the counting sort), ``utility`` (row dot products, widening copies, sample blocks);
``common`` holds the jit helpers and constants they share."""
