"""Typed errors raised by the library; the CLI maps them to exit codes."""


class MemoptError(Exception):
    """A problem the user can fix: bad spec, impossible combination, missing device, out of memory."""


class SpecError(MemoptError):
    """The YAML spec (or an override) is invalid; the message lists every problem with its path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid spec:\n  " + "\n  ".join(problems) if len(problems) > 1 else problems[0])


class StrategyError(MemoptError):
    """A strategy cannot be applied: unknown option, unsupported device, refused combination."""


class OutOfMemory(MemoptError):
    """The step ran out of (real or simulated) device memory."""
