"""packtune's errors: one base, one class per kind of problem a user can fix.

Each message is one line that names what is wrong and where (the config key, the file and line,
the checkpoint, the tensor). The command line prints it as `packtune: <kind> error: <message>` and
exits 2 for bad input (config, data, model, checkpoint) or 1 for a run that could not go on; any
other exception is a bug in packtune and keeps its traceback.
"""

from __future__ import annotations


class PacktuneError(Exception):
    """A problem the user must fix; `kind` names it in the command line's one-line report."""

    kind = "run"
    exit_code = 1


class ConfigError(PacktuneError, ValueError):
    """A bad run configuration; the message names the key and, for a typo, the closest valid one."""

    kind = "config"
    exit_code = 2


class DataError(PacktuneError, ValueError):
    """A problem with the training data or tokenizer.

    The message names the file and line (and the field) at fault. `reason` is a short stable key
    (`malformed_json`, `missing_field`, ...) under which `skip_bad_records` counts skipped records.
    """

    kind = "data"
    exit_code = 2

    def __init__(self, message: str, reason: str = "bad_input") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # DataErrors cross process boundaries (tokenizer workers)
        return (DataError, (str(self), self.reason))


class ModelError(PacktuneError, ValueError):
    """A model packtune cannot reproduce exactly (a config.json option, a family, a transformers
    class); the message names the option."""

    kind = "model"
    exit_code = 2


class CheckpointError(PacktuneError, RuntimeError):
    """A model directory or training checkpoint that cannot be read or written; the message names
    the files and tensors."""

    kind = "checkpoint"
    exit_code = 2


class TrainingError(PacktuneError, RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""

    kind = "training"


class StorageError(CheckpointError):
    """A checkpoint or the exported model could not be written: the disk is full, read-only, not
    permitted, or failing (packtune.storage words the message: what to free or change). Not bad input
    (exit 1, not a CheckpointError's 2): the same command succeeds once the storage is fixed."""

    kind = "storage"
    exit_code = 1
