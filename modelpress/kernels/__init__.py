"""Kernels: a registry keyed by (op, format, backend) with the pure-torch reference always available.

Built-in kernels (reference, dense, int4pack, int8pack, int8-dynamic on CPU; lowrank-merged and
lowrank-factored for float factorised layers on CPU; cuda-fp8 and 2:4 sparse on CUDA, untested here)
register from their own modules when the registry is first asked (:mod:`modelpress.core.plugins`).
``install_kernels`` swaps a model's quantised linears and factorised layers for their kernels;
``generate`` runs Llama-family decoding with a static (optionally quantised) KV cache.
"""
from .install import cast_float_parts, fuse_projections, install_kernels
from .registry import ENV_VAR, KERNELS, KernelPlan, prefer_kernel, requested_kernel, select_kernel

__all__ = ["ENV_VAR", "KERNELS", "KernelPlan", "cast_float_parts", "fuse_projections", "install_kernels", "prefer_kernel",
           "requested_kernel", "select_kernel"]
