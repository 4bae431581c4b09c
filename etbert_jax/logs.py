"""Console logging set-up shared by the `etbert` subcommands that run JAX and orbax."""

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "INFO") -> None:
    """Log at `level` (a logging level name) and keep orbax's per-step absl INFO lines out.

    Orbax reports every save and restore step through absl at INFO, which would bury the job's own
    progress lines, so absl is held at WARNING unless `level` is stricter still.
    """
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    logging.getLogger("absl").setLevel(max(logging.WARNING, logging.getLogger().level))
