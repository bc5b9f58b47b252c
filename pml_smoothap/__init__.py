"""Smooth-AP for pytorch-metric-learning: exact, label-masked, O(B·N) memory."""
from .loss import SmoothAPLoss
from .ops import average_precision, smooth_ap

__all__ = ["SmoothAPLoss", "average_precision", "smooth_ap"]
__version__ = "0.1.0"
