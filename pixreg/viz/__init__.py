"""Diagnostics: what a regularizer did to the pixel features of trained runs.

``pixreg diagnose RUN [RUN ...]`` (or :func:`diagnose`) writes an offline HTML report, PNG
figures and the numbers behind them (CSV/JSON). Layers:

* :mod:`pixreg.viz.stats`: numbers only (streaming class statistics, stratified reservoir,
  RCH calibration maps, histograms); no matplotlib;
* :mod:`pixreg.viz.extract`: loads runs and streams a split through them (bounded memory);
* :mod:`pixreg.viz.plots`: matplotlib figures (Agg backend);
* :mod:`pixreg.viz.report`: the self-contained HTML page;
* :mod:`pixreg.viz.diagnose`: the whole pipeline.

Needs the ``viz`` extra (matplotlib, scikit-learn) for the figures and t-SNE.
"""
from __future__ import annotations

from .stats import FeatureStats, Reservoir, calibration_maps

__all__ = ["diagnose", "FeatureStats", "Reservoir", "calibration_maps"]


def diagnose(*args, **kwargs):
    """See :func:`pixreg.viz.diagnose.diagnose`."""
    from .diagnose import diagnose as _diagnose

    return _diagnose(*args, **kwargs)
