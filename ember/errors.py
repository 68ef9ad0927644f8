"""Exceptions the framework raises for problems a user can fix (bad config, data, missing model)."""


class EmberError(Exception):
    """Base class: a problem with the user's input, reported without a deep traceback."""


class ConfigError(EmberError, ValueError):
    """A config key has a bad value; the message names the key and the fix."""


class DataError(EmberError, ValueError):
    """A data file is missing or malformed; the message names the file and the key."""


class ModelUnavailableError(EmberError, OSError):
    """A model cannot be loaded on this machine; the message says what to do."""


class TrainingDivergedError(EmberError, RuntimeError):
    """A training stage produced a NaN or exploding loss."""


class JobBusyError(EmberError):
    """The job directory is being run by another process; its status is that process's to record."""
