"""Training, evaluation and comparison of segmentation models with the regularizers.

Python API behind the ``pixreg`` command line (:mod:`pixreg.cli`):

* :func:`resolve_config` -- defaults < YAML < ``key.sub=value`` overrides;
* :func:`train` -- one run (method, seed) into a run folder, resumable;
* :func:`evaluate` -- metrics of a model on a dataset (:class:`SegmentationMetrics`);
* :func:`compare_methods` (:func:`pixreg.train.compare.compare`) -- methods x seeds, paired differences with t-intervals;
* :func:`build_criterion` / :func:`parse_method` -- the method registry.
"""
from .config import DEFAULTS, resolve_config
from .methods import METHODS, build_criterion, method_slug, parse_method

__all__ = ["DEFAULTS", "resolve_config", "SegmentationMetrics", "METHODS", "build_criterion", "method_slug",
           "parse_method", "train", "evaluate", "compare_methods"]


def __getattr__(name):  # lazy: importing pixreg.train does not pull torchmetrics/tensorboard/matplotlib
    if name == "SegmentationMetrics":
        from .metrics import SegmentationMetrics

        return SegmentationMetrics
    if name in ("train", "evaluate"):
        from . import trainer

        return getattr(trainer, name)
    if name == "compare_methods":
        from .compare import compare

        return compare
    raise AttributeError(name)
