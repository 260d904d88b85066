"""Triton kernels of convcrf-triton (installed as ``convcrf_triton.kernels``)."""

from ._launch import Repeat, grid_limit
from .band_product import band_mean_field_step, band_message_pass, band_precision, band_step_max_classes
from .blur_iteration import blur_start, blur_step, blur_step_enabled, mean_field_start
from .features import gaussian_features, takes_scalar
from .merged_kernel import gaussian_weights
from .message_passing import (
    from_channels_last,
    fused_message_pass,
    learned_message_pass,
    mean_field_step,
    message_pass,
    prefer_fused,
    step_channels_last,
    to_channels_last,
)

__all__ = ["Repeat", "grid_limit", "gaussian_features", "takes_scalar", "gaussian_weights", "message_pass",
           "fused_message_pass", "learned_message_pass", "mean_field_step", "prefer_fused", "step_channels_last",
           "to_channels_last", "from_channels_last", "blur_start", "blur_step", "blur_step_enabled", "mean_field_start",
           "band_message_pass", "band_mean_field_step", "band_precision", "band_step_max_classes"]
