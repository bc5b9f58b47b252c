"""Smooth-AP for pytorch-metric-learning: exact, label-masked, O(B·N) memory."""
from .cross_batch_memory import CrossBatchMemory
from .loss import SmoothAPLoss
from .ops import average_precision, smooth_ap

__all__ = ["CrossBatchMemory", "SmoothAPLoss", "average_precision", "smooth_ap"]
__version__ = "0.1.0"
