"""The analyses: rays, lines and planes in weight space, their configs, the skeleton they share, results."""

from .config import LineConfig, PlaneConfig, RaysConfig, WidthConfig
from .kinds import line, plane, rays
from .result import Analysis, load

__all__ = ["Analysis", "LineConfig", "PlaneConfig", "RaysConfig", "WidthConfig", "line", "load", "plane", "rays"]
