"""pixreg: training-time pixel-representation regularizers for semantic segmentation."""
__version__ = "0.1.0"
