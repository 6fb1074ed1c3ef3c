"""widthkit: how wide is a neural network's optimum?

Rays, lines and planes in weight space around SGD and SWA solutions, with width numbers and publication
figures (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better Generalization", 3.4).

>>> import widthkit
>>> res = widthkit.rays({"SGD": "sgd.pt", "SWA": "swa.pt"}, dirs=10)
>>> print(res.widths("test_err=+5")["table"])
>>> res.plot()
"""

__version__ = "0.1.0"

# The analysis functions. The command modules of the same names (python -m widthkit.rays) are callable too, so
# widthkit.rays(...) keeps working after `import widthkit.rays` rebinds the attribute to the module.
from .analysis import Analysis, DataSpec, EvalSettings, line, load, plane, rays  # noqa: E402
from .checkpoints import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from .data import Dataset, load_dataset  # noqa: E402
from .evaluator import EvalConfig, EvalSet, Evaluator  # noqa: E402
from .models import create_model, list_models  # noqa: E402

__all__ = [
    "Analysis", "Checkpoint", "DataSpec", "Dataset", "EvalConfig", "EvalSet", "EvalSettings", "Evaluator",
    "create_model", "line", "list_models", "load", "load_checkpoint", "load_dataset", "plane", "rays",
    "save_checkpoint", "__version__",
]
