"""Recipes: TOML files of :class:`~widthkit.training.config.TrainConfig` keys, bundled or the user's own.

A recipe may hold two tables besides the config keys:

- ``[paper]``: the published numbers of the run it reproduces, printed beside the measured ones by the pipeline's
  seed report: ``source`` (where they are published), ``metric`` (``"test_acc"``: test accuracy in %), ``runs``
  (how many runs the mean and std are over), ``sgd = [mean, std]`` and ``swa = {"BUDGET" = [mean, std], ...}``.
- ``[needs]``: settings the recipe cannot know (a data folder, pretrained weights), each with a line telling the
  user what to pass; a recipe used without them is refused with that line.

>>> load_recipe("vgg16-cifar100").epochs
200
>>> recipe_info("vgg16-cifar100").paper["swa"][1.5]
(74.27, 0.25)
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

__all__ = ["RecipeInfo", "list_recipes", "load_recipe", "read_config_file", "layered_config", "recipe_info"]

TABLES = ("paper", "needs")  # recipe tables that are not config keys


@dataclass
class RecipeInfo:
    """What a recipe says besides its config: the published numbers (``paper``: ``{"source", "metric", "runs",
    "sgd": (mean, std), "swa": {budget: (mean, std)}, "note"}`` or None) and the settings it needs from the
    user (``needs``: key -> what to pass)."""

    name: str
    paper: dict | None = None
    needs: dict = field(default_factory=dict)


def _recipe_dir():
    return resources.files("widthkit.training") / "recipes"


def list_recipes() -> list[str]:
    """Names of the bundled recipes (``widthkit/training/recipes/*.toml``), sorted."""
    return sorted(p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str | os.PathLike) -> TrainConfig:
    """A :class:`TrainConfig` from a bundled recipe name (see :func:`list_recipes`) or a TOML file.

    The TOML holds top-level keys named like the fields of :class:`TrainConfig` (``model_kwargs`` as a table);
    keys left out keep their defaults.

    Raises:
        ValueError: unknown recipe (lists the bundled ones), unreadable TOML, unknown key (names it), an
            invalid value, or a setting the recipe needs (``[needs]``) that it cannot hold itself.
    """
    _, source = _recipe_text(name_or_path)
    try:
        return layered_config(name_or_path)
    except ValueError as err:
        if str(err).startswith(source):
            raise
        raise ValueError(f"{source}: {err}") from None


def read_config_file(name_or_path: str | os.PathLike) -> tuple[dict, str]:
    """(key/value pairs, a description of the source) of a recipe name or TOML file, with every key checked
    against the fields of :class:`TrainConfig`; the values are validated only once a config is built from
    them (the CLI layers a ``--config`` file over a recipe). The ``[paper]`` and ``[needs]`` tables are left
    out (see :func:`recipe_info`)."""
    values, source = _read_toml(name_or_path)
    values = {k: v for k, v in values.items() if k not in TABLES}
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise ValueError(f"{source}: unknown training config key(s) {unknown}; valid keys: {valid}")
    return values, source


def recipe_info(name_or_path: str | os.PathLike) -> RecipeInfo:
    """The ``[paper]`` numbers and ``[needs]`` of a recipe (see the module docstring), checked."""
    values, source = _read_toml(name_or_path)
    needs = values.get("needs", {})
    if not isinstance(needs, dict) or not all(isinstance(v, str) for v in needs.values()):
        raise ValueError(f"{source}: [needs] must map config keys to a line saying what to pass")
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    if set(needs) - valid:
        raise ValueError(f"{source}: [needs] names unknown config key(s) {sorted(set(needs) - valid)}")
    paper = values.get("paper")
    return RecipeInfo(name=_stem(name_or_path), paper=None if paper is None else _check_paper(paper, source),
                      needs=dict(needs))


def layered_config(recipe: str | os.PathLike, config_file: str | os.PathLike | None = None,
                   overrides: dict | None = None, defaults: dict | None = None) -> TrainConfig:
    """A recipe, then ``defaults`` (a caller's own, e.g. the pipeline keeps iterates), then a TOML file's keys,
    then single overrides (the CLI's flags); validated once.

    Raises:
        ValueError: as :func:`load_recipe`; a key the recipe ``[needs]`` not given by ``config_file`` or
            ``overrides`` names the key and what to pass.
    """
    values, source = read_config_file(recipe)
    values.update(defaults or {})
    given = dict(read_config_file(config_file)[0]) if config_file else {}
    given.update(overrides or {})
    missing = {k: v for k, v in recipe_info(recipe).needs.items() if given.get(k) is None}
    if missing:
        key, what = next(iter(missing.items()))
        flag = "--" + key.replace("_", "-")
        raise ValueError(f"{source} needs {key} ({flag}): {what}")
    values.update(given)
    return TrainConfig.from_dict(values)


def _stem(name_or_path) -> str:
    stem = Path(os.fspath(name_or_path)).name
    return stem[:-5] if stem.endswith(".toml") else stem


def _read_toml(name_or_path: str | os.PathLike) -> tuple[dict, str]:
    text, source = _recipe_text(name_or_path)
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ValueError(f"reading {source} needs tomllib (Python >= 3.11) or the 'tomli' package")
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source} is not valid TOML: {err}") from None


def _recipe_text(name_or_path: str | os.PathLike) -> tuple[str, str]:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"recipe must be a recipe name or a path to a TOML file, got {name_or_path!r}")
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.suffix == ".toml" or os.sep in raw or path.is_file():
        if not path.is_file():
            raise ValueError(f"recipe file {path} does not exist; bundled recipes: {list_recipes()}")
        return path.read_text(encoding="utf-8"), str(path)
    if raw not in list_recipes():
        raise ValueError(f"unknown recipe {raw!r}; bundled recipes: {list_recipes()} (or pass a path to a .toml file)")
    return (_recipe_dir() / f"{raw}.toml").read_text(encoding="utf-8"), f"recipe {raw!r}"


def _mean_std(value, where: str) -> tuple[float, float]:
    ok = (isinstance(value, list) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok:
        raise ValueError(f"{where} must be [mean, std] (two numbers), got {value!r}")
    return float(value[0]), float(value[1])


def _check_paper(paper, source: str) -> dict:
    if not isinstance(paper, dict):
        raise ValueError(f"{source}: [paper] must be a table")
    unknown = set(paper) - {"source", "metric", "runs", "sgd", "swa", "note"}
    if unknown:
        raise ValueError(f"{source}: [paper] has unknown key(s) {sorted(unknown)}; valid: source, metric, runs, "
                         "sgd, swa, note")
    if not isinstance(paper.get("source"), str) or not paper["source"]:
        raise ValueError(f"{source}: [paper] needs source = \"where the numbers are published\"")
    if paper.get("metric", "test_acc") != "test_acc":
        raise ValueError(f"{source}: [paper] metric must be \"test_acc\" (test accuracy in %)")
    out = {"source": paper["source"], "metric": "test_acc", "runs": paper.get("runs"), "note": paper.get("note"),
           "sgd": _mean_std(paper["sgd"], f"{source}: [paper] sgd") if "sgd" in paper else None, "swa": {}}
    swa = paper.get("swa", {})
    if not isinstance(swa, dict):
        raise ValueError(f"{source}: [paper] swa must be a table {{\"BUDGET\" = [mean, std]}}")
    for key, value in swa.items():
        try:
            budget = float(key)
        except ValueError:
            raise ValueError(f"{source}: [paper] swa key {key!r} is not a number of budgets (e.g. \"1.25\")") from None
        out["swa"][budget] = _mean_std(value, f"{source}: [paper] swa.{key}")
    return out
