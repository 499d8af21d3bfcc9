"""Pure-function forms of the four regularizers (the ``torch.nn.functional`` of pixreg).

Each function takes explicit state (centres, prototypes) and hyper-parameters and holds
none; the matching ``nn.Module`` (``pixreg.CPlus1Loss``, ...) keeps hyper-parameters and
state. Docstrings give the equations, shapes and an example.
"""
from .losses.car import car_loss
from .losses.cplus1 import cplus1_loss, update_moving_average_centres
from .losses.lall import locally_adaptive_loss
from .losses.rch import rch_loss, rch_update_prototypes

__all__ = [
    "cplus1_loss",
    "update_moving_average_centres",
    "car_loss",
    "locally_adaptive_loss",
    "rch_loss",
    "rch_update_prototypes",
]
