"""Pure tensor maths. Every function takes ``[B, H, T, D]`` tensors and returns ``[B, H, T_q, D_v]``.

``naive.py`` holds plain, materialised references (they build the full ``T_q x T_k`` matrix on purpose);
the other modules hold the fast paths that the variants dispatch to.
"""
