"""Triton kernels of convcrf-triton (installed as ``convcrf_triton.kernels``)."""

from .merged_kernel import gaussian_weights
from .message_passing import fused_message_pass, message_pass, prefer_fused

__all__ = ["gaussian_weights", "message_pass", "fused_message_pass", "prefer_fused"]
