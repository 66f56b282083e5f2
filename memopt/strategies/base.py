"""What every strategy is: a name, a validated options model, a model transform and a step hook."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from memopt.core.results import Category
from memopt.model.kv_plan import KvPlan
from memopt.spec.strategy_spec import Options

if TYPE_CHECKING:
    import torch

    from memopt.adapters import ModelAdapter
    from memopt.spec import Spec


@dataclass
class StepPlan:
    """How the runner performs one training step; strategies adjust it in ``configure``.

    contexts: entered around each micro-batch's forward+backward (outermost first).
    micro_batches: the global batch is split into this many, gradients accumulate.
    notes: what the report should tell the user about this step (e.g. a kernel that could not be used).
    kv: the KV cache a generation uses (the spec's layout unless a kv strategy changes it).
    prefill_chunk: the prefill runs this many prompt tokens at a time (None: all at once).
    """

    contexts: list[Callable[[], AbstractContextManager[Any]]] = field(default_factory=list)
    micro_batches: int = 1
    notes: list[str] = field(default_factory=list)
    kv: KvPlan = field(default_factory=KvPlan)
    prefill_chunk: int | None = None


ADAPTERS_NOTE = ("{name}: only the adapters train, not the model's weights: its drift is the distance from a full "
                 "fine-tune after the same steps (another training), not an accuracy loss")


class SavedTensors:
    """Where a strategy tells the tracker what its own hooks do: tensors kept for backward (checkpointing's
    recomputation, offload's kept tensors), a tensor of a known category (offloaded optimizer state read back),
    a storage resized in place (a parameter released or brought back). The runner points it at the tracker
    while it measures."""

    def __init__(self) -> None:
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.tracker: Any | None = None  # memopt.measure.tracker.TensorTracker while measuring

    def __call__(self, tensor: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer(tensor)

    def mark(self, tensor: torch.Tensor, category: Category) -> None:
        if self.tracker is not None:
            self.tracker.mark(tensor, category)

    def resized(self, storage: Any) -> None:
        if self.tracker is not None:
            self.tracker.resized(storage)


OptionsT = TypeVar("OptionsT", bound=Options)


class Strategy(Generic[OptionsT]):
    """A memory strategy for ``device``. Subclasses set the class attributes and override what they need;
    ``Strategy[TheirOptions]`` types ``self.options``."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]]
    summary: ClassVar[str]          # what it does, one line
    saves: ClassVar[str]            # where the bytes go
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    lossy: ClassVar[bool] = False
    # lossy in what training does (optimizer state), not in the weights: drift is taken after identical steps
    drift_shows_in_training: ClassVar[bool] = False
    order: ClassVar[int] = 50       # composition order: lower applies first
    modes: ClassVar[tuple[str, ...]] = ("train",)  # the run modes it applies to (run.mode)
    refuses: ClassVar[dict[str, str]] = {}  # other strategy name -> why the pair cannot work
    # what of the model's structure it needs beyond blocks and Linears (e.g. "attention kernel"): refused up front on
    # models memopt only sees as an nn.Module (a Python factory's)
    needs_to_know: ClassVar[str] = ""
    # typical settings to try (estimate --fits, optimize), lightest first, most saving last: option mappings as
    # they would be written (the labels show them so), made StrategySpecs by candidate_specs; () = just the name
    candidates: ClassVar[tuple[dict[str, Any], ...]] = ()
    inference_candidates: ClassVar[tuple[dict[str, Any], ...] | None] = None  # in infer/generate; None: candidates
    # the tracker counts the whole-size parameters it gathers for compute as unshard buffers (FSDP)
    unshards: ClassVar[bool] = False
    shards_model_states: ClassVar[bool] = False  # each of the N ranks holds 1/N of params, grads, optimizer state
    searched: ClassVar[bool] = True  # tried by optimize and --fits (not the ones that change how many processes run)
    changes_allocated: ClassVar[bool] = True  # False: only how the allocator reserves (nothing for a trace to see)

    @classmethod
    def idle_at(cls, options: Any, spec: Spec) -> bool:
        """Whether, with these options, it has nothing to do at this spec's shapes (the run would be the same)."""
        return False

    @classmethod
    def set_up_process(cls, options: Any) -> None:
        """Called in the run's own process before anything there initialises a device (``allocator`` sets the CUDA
        allocator's environment)."""

    @classmethod
    def micro_batches(cls, options: Any) -> int:
        """Into how many micro-batches it splits the step's batch."""
        return 1

    def __init__(self, options: OptionsT, spec: Spec, device: str, saved: SavedTensors | None = None):
        self.options: OptionsT = options
        self.spec = spec
        self.device = device
        self.saved = saved or SavedTensors()

    def check(self) -> None:
        """Raise StrategyError if this strategy cannot work here (beyond ``refuses``/``devices``); no side effects."""

    def apply(self, model: ModelAdapter) -> None:
        """Transform the model in place, through its adapter (before the optimizer is built)."""

    def configure(self, plan: StepPlan) -> None:
        """Adjust the step: add contexts, split the batch, fuse the optimizer."""

    def attach_optimizer(self, model: ModelAdapter, make_optimizer: Callable[..., Any]) -> Any | None:
        """Return an optimizer to use instead of the default one, or None."""
        return None

    def report(self) -> dict[str, Any]:
        """Measured facts this strategy wants in the report (e.g. bytes moved off the device)."""
        return {}

    def close(self) -> None:
        """Release what the strategy holds outside the model (e.g. temporary files); called when the run ends."""
