"""What every strategy is: a name, a validated options model, a model transform and a step hook."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from memopt.model import LanguageModel
    from memopt.spec import Spec


class Options(BaseModel):
    """Base of every strategy's options: frozen, strict, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


@dataclass
class StepPlan:
    """How the runner performs one training step; strategies adjust it in ``configure``.

    contexts: entered around each micro-batch's forward+backward (outermost first).
    micro_batches: the global batch is split into this many, gradients accumulate.
    step_in_backward: the optimizer already stepped inside backward; the runner skips ``step()``.
    notes: what the report should tell the user about this step (e.g. a kernel that could not be used).
    """

    contexts: list[Callable[[], AbstractContextManager[Any]]] = field(default_factory=list)
    micro_batches: int = 1
    step_in_backward: bool = False
    notes: list[str] = field(default_factory=list)


class Strategy:
    """A memory strategy. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]]
    summary: ClassVar[str]          # what it does, one line
    saves: ClassVar[str]            # where the bytes go
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    lossy: ClassVar[bool] = False
    # lossy in what training does (optimizer state), not in the weights: drift is taken after identical steps
    drift_shows_in_training: ClassVar[bool] = False
    order: ClassVar[int] = 50       # composition order: lower applies first
    refuses: ClassVar[dict[str, str]] = {}  # other strategy name -> why the pair cannot work
    # typical settings to try (estimate --fits, optimize), lightest first, most saving last; () = just the name
    candidates: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Options, spec: Spec):
        self.options = options
        self.spec = spec

    def check(self, device: str) -> None:
        """Raise StrategyError if this strategy cannot work here (beyond ``refuses``/``devices``)."""

    def apply(self, model: LanguageModel) -> None:
        """Transform the model in place (before the optimizer is built)."""

    def configure(self, plan: StepPlan) -> None:
        """Adjust the step: add contexts, split the batch, fuse the optimizer."""

    def attach_optimizer(self, model: LanguageModel, make_optimizer: Callable[..., Any]) -> Any | None:
        """Return an optimizer to use instead of the default one, or None."""
        return None

    def report(self) -> dict[str, Any]:
        """Measured facts this strategy wants in the report (e.g. bytes moved off the device)."""
        return {}
