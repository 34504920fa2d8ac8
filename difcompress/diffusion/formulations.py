"""Which formulation a denoiser was trained with, read off its scheduler: rectified flow
(flow.py) for a FlowMatch scheduler, DDPM (ddpm.py) for every other. The dispatch lives
here so that neither formulation imports the other."""

from __future__ import annotations

from typing import Any

from difcompress.diffusion.ddpm import DDPMFormulation
from difcompress.diffusion.flow import FlowFormulation, FlowTraining


def is_flow(scheduler: Any) -> bool:
    return "FlowMatch" in type(scheduler).__name__


def formulation_for(scheduler: Any, flow: FlowTraining | None = None) -> DDPMFormulation | FlowFormulation:
    """The formulation of a denoiser with `scheduler`; `flow` says how a flow-matching family
    draws its training timesteps and samples (its family knows; uniform u by default)."""
    if is_flow(scheduler):
        return FlowFormulation(scheduler, flow or FlowTraining())
    return DDPMFormulation(scheduler)
