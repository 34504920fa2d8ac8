"""Every objective `--loss` offers, by name: what it needs and how to call it.

Adding an objective is one entry here (the CLI choices, the recipe schema and the trainer
read this table). ``kind`` says which inputs an objective consumes:

* ``task``: the denoising target only, no teacher (how Diff-Pruning fine-tunes);
* ``output``: student and teacher outputs at the same noisy input (output KD);
* ``feature``: hooked intermediate outputs only (the trainer's feature term).

Every output objective also comes composed with the feature term, ``NAME+feat`` (the
LIFT/PLACE authors' DDPM setting is ``place+feat``): the same output KD, plus feature KD
weighted by ``--w-feat`` (default 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import Tensor

from difcompress.core.errors import UserError
from difcompress.objectives.baselines import dist_loss, mse_loss
from difcompress.objectives.core import (
    FIT_EPS,
    PLACE_GROUP_SIZE,
    KDTerms,
    lift_loss,
    place_loss,
)


@dataclass(frozen=True)
class OutputOptions:
    """The settings output objectives may use; each reads the ones it needs."""

    group_size: int = PLACE_GROUP_SIZE
    coarse_norm: str = "l2"
    eps: float = FIT_EPS


@dataclass(frozen=True)
class Objective:
    name: str
    kind: Literal["task", "output", "feature"]
    description: str
    output_fn: Callable[[Tensor, Tensor, OutputOptions], KDTerms] | None = None
    with_features: bool = False  # the feature term is on by default (feature, NAME+feat)


_BASE = (
    Objective("task", "task", "denoising loss only, no teacher (Diff-Pruning's fine-tuning)"),
    Objective("mse", "output", "output KD: MSE to the teacher's prediction",
              lambda s, t, o: mse_loss(s, t)),
    Objective("feature", "feature", "feature KD only: MSE between hooked block outputs", with_features=True),
    Objective("dist", "output", "DIST: Pearson-correlation KD (Huang et al. 2022)",
              lambda s, t, o: dist_loss(s, t)),
    Objective("lift", "output", "LIFT: coarse (affine fit) then fine, one fit per channel",
              lambda s, t, o: lift_loss(s, t, coarse_norm=o.coarse_norm, eps=o.eps)),
    Objective("place", "output", "PLACE: LIFT on groups of G positions ranked by error",
              lambda s, t, o: place_loss(s, t, group_size=o.group_size, coarse_norm=o.coarse_norm, eps=o.eps)),
)
OBJECTIVES: dict[str, Objective] = {o.name: o for o in _BASE} | {
    f"{o.name}+feat": Objective(f"{o.name}+feat", "output", f"{o.description}, plus feature KD", o.output_fn, True)
    for o in _BASE if o.kind == "output"}
LOSS_NAMES = tuple(OBJECTIVES)


def objective_name(loss: str, w_feat: float) -> str:
    """What a run optimises, named plainly: an output objective with a feature term on is NAME+feat."""
    objective = get_objective(loss)
    if objective.kind == "output" and w_feat > 0 and not objective.with_features:
        return f"{loss}+feat"
    return loss


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise UserError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}", exit_code=2) from None


def kd_loss(name: str, student: Tensor, teacher: Tensor, options: OutputOptions = OutputOptions()) -> KDTerms:
    """Output-KD objective ``name`` on (student, teacher) outputs."""
    objective = get_objective(name)
    if objective.output_fn is None:
        raise UserError(f"loss {name!r} is not an output objective; choose one of "
                        f"{', '.join(n for n, o in OBJECTIVES.items() if o.output_fn)}", exit_code=2)
    return objective.output_fn(student, teacher, options)
