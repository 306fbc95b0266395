"""Stream builders (installed as ``clpeft.scenarios``); importing this registers the built-ins."""

from clpeft.scenarios import avalanche_stream, class_incremental  # noqa: F401
