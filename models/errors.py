"""Domain exceptions, one root (LinejudgeError) for every floor. Each message says what is wrong
and what to do about it."""


class LinejudgeError(Exception):
    """Base for errors shown to a user as one clear line."""


class ConfigError(LinejudgeError):
    """A configuration file or value is wrong."""


class BadFrame(LinejudgeError):
    """An image is missing, empty, corrupt or of an unusable shape."""


class BadExplanation(LinejudgeError):
    """A candidate explanation is empty, too long or not text."""


class ModelError(LinejudgeError):
    """A model or bundle cannot be used."""


class TrialInconclusive(ModelError):
    """A hot-swapped model judged too few inspections in time because too few frames came (the
    line paused) and raised no error: it is swapped back and offered again on the next sync pass."""


class StoreError(LinejudgeError):
    """The appliance database cannot do what was asked (unknown row, locked operator, closed store)."""


class CaptureError(LinejudgeError):
    """A camera or replay source cannot deliver frames."""


class SyncError(LinejudgeError):
    """A sync pass with HQ could not finish (network, HQ refusal, budget spent); the next pass retries."""
