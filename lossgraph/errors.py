"""The exceptions lossgraph raises; each message names the offending key, shape or value."""


class ConfigError(ValueError):
    """A loss config dict is invalid: unknown type, unknown key, wrong type or value."""


class InputError(ValueError):
    """A tensor passed to a compiled loss has the wrong shape, dtype, device or values."""


class BackendError(RuntimeError):
    """A backend could not compile or run a kernel (the dump folder holds the compiler log)."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log
