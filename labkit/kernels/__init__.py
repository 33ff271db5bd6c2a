"""Part V: Triton kernels (compiled on a GPU, run by Triton's interpreter on a CPU).

    FlashAttention (fwd + bwd)        labkit.kernels.flash_attention  chapter 16
    RMSNorm, SwiGLU, RoPE             labkit.kernels.rmsnorm/swiglu/rope  chapter 17
    cross-entropy, fused linear + CE  labkit.kernels.cross_entropy/fused_linear_ce  chapter 17

Import labkit before triton in a fresh process: labkit switches Triton to its interpreter
when there is no GPU, and that must happen before any kernel is defined. The functions are
used through their modules (`from labkit.kernels import rmsnorm; rmsnorm.rms_norm(x, w)`): several
share their module's name, so this package re-exports nothing.
"""

import labkit  # noqa: F401  (sets TRITON_INTERPRET before any kernel module defines a kernel)
