"""convcrf-triton: Convolutional CRFs (Teichmann & Cipolla 2018) with Triton kernels."""

from .config import CRFConfig
from .functional import mean_field
from .module import ConvCRF

__all__ = ["ConvCRF", "CRFConfig", "mean_field"]
__version__ = "0.1.0"
