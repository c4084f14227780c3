"""The operations users run, one module each (the API function; the CLI wraps it in cli/<name>.py), plus the
modules that serve them (blockmap, journal, rawimport). Public entry points are re-exported by ``vhdcore``."""
