"""The base class of errors that are the user's to fix (a configuration, the data, a checkpoint to resume).

`dig train` reports them as one line on rank 0 and exits with code 2 (dig/cli.py); anything else is a bug or an
accident and keeps its traceback. Subclass it (with the builtin type callers already expect, e.g.
`class ConfigError(ValueError, UserError)`) for a new kind of such error."""


class UserError(Exception):
    """Something the user asked for cannot be done; the message says what and what to change."""


class DatasetError(ValueError, UserError):
    """A dataset that cannot feed this run (missing or invalid manifest, too few shards, wrong latent size, a data
    position that does not fit it); the message names the dataset and what to check."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """No manifest.json where the dataset should be."""
