"""PML's CrossBatchMemory, with SmoothAPLoss added to its whitelist of supported losses."""
from pytorch_metric_learning import losses


class CrossBatchMemory(losses.CrossBatchMemory):
    """``pytorch_metric_learning.losses.CrossBatchMemory`` that also accepts SmoothAPLoss.

    Same signature and behaviour: PML 2.9's wrapper refuses losses outside a list of names
    (``supported_losses``); this subclass only extends that list. Each query is ranked against
    the memory (the current batch included) without its own copy.
    """

    @staticmethod
    def supported_losses():
        return losses.CrossBatchMemory.supported_losses() + ["SmoothAPLoss"]
