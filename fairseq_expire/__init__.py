"""fairseq-expire: Expire-Span (Sukhbaatar et al., ICML 2021) for fairseq, loaded with ``--user-dir fairseq_expire``.

Importing the package registers the ``expire_span_lm`` / ``fixed_span_lm`` models and presets, the
``language_modeling_with_memory`` task and the ``expire_span_cross_entropy`` criterion.
"""

try:
    import fairseq_expire_compat
except ImportError as error:  # used from a source tree that was never installed
    raise ImportError(
        "fairseq_expire_compat is missing: install the plugin with `make install` or `pip install .` "
        "from the fairseq-expire repository."
    ) from error

fairseq_expire_compat.install()

try:
    import fairseq  # noqa: F401
except ImportError as error:
    raise ImportError(
        "fairseq_expire needs fairseq 0.12.2: `pip install fairseq==0.12.2` (or `make install`)."
    ) from error

from . import criterions, models, tasks  # noqa: E402,F401  (registration)
