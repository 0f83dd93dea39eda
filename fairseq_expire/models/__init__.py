from . import adaptive_span_lm, compressive_lm, expire_span_lm  # noqa: F401
