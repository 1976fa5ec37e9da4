"""The errors featurestore raises for bad input.

Every one of them is a `FeaturestoreError`: the CLI prints its message (which names the file, field
or flag at fault and the fix) and exits non-zero, without a traceback. Anything else escaping a
command is a bug and keeps its traceback.
"""


class FeaturestoreError(Exception):
    """Bad input or a warehouse state a command cannot work with."""


class UnknownStageError(FeaturestoreError):
    """A stage name that the model does not have."""


class NotFoundError(FeaturestoreError):
    """An unknown run, checkpoint, activation set or table."""


class InvalidActivationsError(FeaturestoreError):
    """Activation sets that cannot be used, or combined: misaligned rows, d_model, NaN or Inf."""


class CorruptCheckpointError(FeaturestoreError):
    """A checkpoint file that is missing, truncated or not a safetensors file."""


class SchemaVersionError(FeaturestoreError):
    """A warehouse whose schema version this featurestore does not know."""


class WarehouseBusyError(FeaturestoreError):
    """Another job holds the warehouse's writer lock."""


class FitRejectedError(FeaturestoreError):
    """A fitted dictionary that misses a quality bound: nothing registered, the fit kept aside."""


class DamagedCatalogError(FeaturestoreError):
    """The catalog database cannot be read: restore it (`featurestore catalog restore`)."""


class QueryRefusedError(FeaturestoreError):
    """Read-only SQL that would change the warehouse or reach outside it."""


class QueryTimeoutError(FeaturestoreError):
    """Read-only SQL that ran past its time limit and was stopped."""
