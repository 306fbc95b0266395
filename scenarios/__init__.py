"""Stream builders (installed as ``clpeft.scenarios``); importing this registers the built-ins."""

from clpeft.scenarios import class_incremental  # noqa: F401
