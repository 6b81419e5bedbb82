"""Errors raised by botaclip; each message names the file or field, the bad value and the fix."""


class BotaclipError(Exception):
    """Root of every error botaclip raises on purpose."""


class CatalogError(BotaclipError, ValueError):
    """The catalog (YAML) is invalid: unknown key, bad value, missing dataset."""


class InputDataError(BotaclipError, ValueError):
    """An input file (raster, relevés, sites) is missing, unreadable or malformed."""


class CRSMismatchError(BotaclipError, ValueError):
    """Inputs cannot be placed on the region grid because of their CRS."""


class WeightsError(BotaclipError, ValueError):
    """A model checkpoint does not match the architecture."""


class StageError(BotaclipError, RuntimeError):
    """A pipeline stage cannot run (missing upstream output, empty data)."""


class StorageError(BotaclipError, OSError):
    """The artifact store cannot be written: workdir not a folder, not writable, disk full."""
