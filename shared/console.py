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
