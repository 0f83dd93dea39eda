from . import expire_span_cross_entropy  # noqa: F401
