from . import language_modeling_with_memory  # noqa: F401
