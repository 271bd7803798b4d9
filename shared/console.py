"""What a person sees on the terminal: fedrec's own lines, not its libraries' chatter.

Flower logs INFO and DEBUG lines with ANSI colours, its deprecation notices, and (through the
root handler Opacus installs with `logging.basicConfig` at import) every record a second time
with a timestamp; Ray adds a FutureWarning. Unless --verbose: Flower's warnings and errors only,
each once, coloured only on a terminal, and Ray's FutureWarning off. Light on purpose: no Flower
import until a command needs it.
"""
from __future__ import annotations

import logging
import sys
import warnings

QUIET_FLOWER = ("deprecated", "DEPRECATED")


class _DropDeprecations(logging.Filter):
    """Flower's notices about its own deprecated APIs (ours are pinned and known): not the user's concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(word in record.getMessage() for word in QUIET_FLOWER)


def tame_library_output(verbose: bool = False) -> None:
    from flwr.supercore.logger import FLOWER_LOGGER, update_console_handler
    FLOWER_LOGGER.propagate = False   # once, through Flower's own handler (not Opacus's root one too)
    if verbose:
        return
    update_console_handler(level=logging.WARNING, colored=sys.stderr.isatty())
    if not any(isinstance(f, _DropDeprecations) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_DropDeprecations())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")


class Progress:
    """Progress a person can read wherever the output goes: a tqdm bar on a terminal; into a file
    or a pipe (a log, CI) one plain line every `every` steps and at the last, never `\\r` frames.
    Fields are named in full, and a figure is shown only once it exists."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, every: int | None = None):
        from tqdm import tqdm
        self.total, self.desc, self.unit, self.enabled, self.n = total, desc, unit, enabled, 0
        self.every = every or max(1, total // 20)
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) if enabled and terminal else None

    def update(self, at: int | None = None, **fields) -> None:
        """One more step done (`at`: the step's own number, e.g. a resumed run's round)."""
        self.n = self.n + 1 if at is None else at
        self.shown = {k: v for k, v in fields.items() if v is not None}
        if self.bar is not None:
            self.bar.update(self.n - self.bar.n)
            self.bar.set_postfix(self.shown)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            self._line()

    def _line(self) -> None:
        said = ", ".join(f"{k} {v}" for k, v in self.shown.items())
        print(f"{self.desc}: {self.unit} {self.n}/{self.total}" + (f": {said}" if said else ""), file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n and self.n % self.every and self.n != self.total:
            self._line()   # stopped early: the last step still gets its line
