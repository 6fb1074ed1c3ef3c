"""The ensemble of several checkpoints (their averaged softmax) beside each member and single models.

    python -m widthkit.ensemble --iterates checkpoints/digits --swa checkpoints/digits/swa.pt \
        --compare SGD=checkpoints/digits/sgd.pt
    python -m widthkit.ensemble --ckpt a.pt --ckpt b.pt --ckpt c.pt

Prints test accuracy, NLL and forward passes per prediction of the ensemble, of each single model and of each
member, and the members' pairwise disagreement; writes the HDF5 file (``analyses/`` by default) and a figure
(error and NLL as members are added, the disagreement matrix) into ``figures/``. ``--iterates FOLDER`` takes a
training run's snapshots: the iterates SWA averaged (``swa_iter_*.pt``, with ``--save-iterates``) or FGE
collected (``fge_*.pt``, ``--mode fge``).
"""

from __future__ import annotations

import argparse

from . import cli
from .analyses.ensemble import EnsembleConfig, ensemble
from .report.summary import finish_ensemble


def build_parser() -> argparse.ArgumentParser:
    return cli.analysis_parser("ensemble", __doc__, "two or more members, in the order they join; or --iterates",
                               ("ensemble", EnsembleConfig), ckpt_required=False)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if not args.ckpt and not args.iterates:
            raise ValueError("name the members: --ckpt A --ckpt B ..., or --iterates FOLDER (a run's snapshots)")
        return cli.run_command(ensemble, "ensemble", args, EnsembleConfig,
                               lambda figures: finish_ensemble(figures, cli.log))

    return cli.run(body)


cli.callable_module(__name__, ensemble)  # widthkit.ensemble(...) stays the Python API after the import

if __name__ == "__main__":
    raise SystemExit(main())
