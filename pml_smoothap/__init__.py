"""Smooth-AP for pytorch-metric-learning: exact, label-masked, O(B·N) memory."""
from .cross_batch_memory import CrossBatchMemory
from .large_batch import large_batch_backward
from .loss import SmoothAPLoss
from .ops import average_precision, smooth_ap

__all__ = ["CrossBatchMemory", "SmoothAPLoss", "large_batch_backward", "average_precision", "smooth_ap"]
__version__ = "0.1.0"
