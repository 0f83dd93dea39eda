from . import expire_span_lm  # noqa: F401
