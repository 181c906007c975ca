"""Triton kernels of SLIM (spec section 6) and their launchers; nothing model-specific here.

``kernels`` holds the @triton.jit kernels, ``backend`` the launchers behind the op boundary
(backend name ``triton``)."""
