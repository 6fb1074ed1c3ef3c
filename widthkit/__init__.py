"""widthkit: how wide is a neural network's optimum?

Rays, lines and planes in weight space around SGD and SWA solutions, with width numbers and publication
figures (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better Generalization", 3.4).

>>> import widthkit
>>> res = widthkit.rays({"SGD": "sgd.pt", "SWA": "swa.pt"}, dirs=10)
>>> print(res.widths("test_err=+5")["table"])
>>> res.plot()

Layers (sub-packages): ``inputs`` (data, checkpoints), ``engine`` (θ layout, directions, objectives, the
evaluator, torchrun), ``analyses`` (rays, line, plane and their skeleton), ``report`` (HDF5 store, widths,
figures, summaries), ``training`` (the SGD/SWA trainer and recipes); ``runtime`` and ``settings`` are shared.
The commands ``python -m widthkit.{rays,line,plane,plot,train,pipeline,ensemble,curve}`` are thin wrappers over
them.
"""

from ._version import __version__
from .analyses import Analysis, LineConfig, PlaneConfig, RaysConfig, WidthConfig, line, load, plane, rays
from .analyses.curve import CurveConfig, CurveResult, curve, load_curve
from .analyses.ensemble import EnsembleConfig, EnsembleResult, ensemble, load_ensemble
from .analyses.hessian import curvature, sharpness, surface_curvature
from .engine.config import EvalConfig
from .engine.curvature import CurvatureConfig, LossConfig
from .engine.sharpness import SharpnessConfig
from .engine.evaluator import EvalSet, Evaluator
from .inputs.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from .inputs.data import Dataset, load_dataset
from .models import create_model, list_models

__all__ = [
    "Analysis", "Checkpoint", "Dataset", "EvalConfig", "EvalSet", "Evaluator", "LineConfig", "PlaneConfig",
    "RaysConfig", "WidthConfig", "create_model", "line", "list_models", "load", "load_checkpoint", "load_dataset",
    "plane", "rays", "save_checkpoint", "__version__",
    "CurvatureConfig", "LossConfig", "SharpnessConfig", "curvature", "sharpness", "surface_curvature",
    "EnsembleConfig", "EnsembleResult", "ensemble", "load_ensemble", "CurveConfig", "CurveResult", "curve",
    "load_curve",
]
