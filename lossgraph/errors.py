"""The exceptions lossgraph raises; each message names the offending key, shape or value.

Note [Exception compatibility]: wherever MMDetection 3.3.0 raises for a config or an input,
lossgraph raises an instance of the same built-in class, at the same moment (building the loss
or calling it), so code that catches MMDetection's exceptions keeps working. The classes below
keep lossgraph's own ConfigError / InputError (both ValueError) and add the built-in MMDetection
raises through multiple inheritance: an `assert` in MMDetection is a *Assertion here, a
`raise NotImplementedError` a *NotImplemented, an unknown keyword a ConfigTypeError. A shape that MMDetection rejects is rejected by an
`assert` in some losses (pred.size() == target.size()) and by torch's broadcasting (a
RuntimeError) in others, so InputShapeError is both. Where lossgraph checks more than MMDetection
(a config value of the wrong type, GHMC bins=0, an invalid `reduction`), it raises at build what
MMDetection would raise, if at all, only when called.
"""


class ConfigError(ValueError):
    """A loss config dict is invalid: unknown type, unknown key, wrong type or value."""


class InputError(ValueError):
    """A tensor passed to a compiled loss has the wrong shape, dtype, device or values."""


class ConfigAssertion(ConfigError, AssertionError):
    """A config value MMDetection rejects with an `assert` (e.g. FocalLoss use_sigmoid=False)."""


class ConfigNotImplemented(ConfigError, NotImplementedError):
    """A config MMDetection accepts but does not implement (e.g. DiceLoss softmax); raised when
    MMDetection raises it, at the call."""


class ConfigTypeError(ConfigError, TypeError):
    """An unknown config key (a TypeError from MMDetection's __init__) or a value of the wrong
    type (MMDetection's ops raise TypeError on it, at the call; lossgraph rejects it at build)."""


class InputAssertion(InputError, AssertionError):
    """A call argument MMDetection rejects with an `assert` (e.g. an invalid reduction_override)."""


class InputShapeError(InputError, AssertionError, RuntimeError):
    """A tensor whose shape does not fit pred's: MMDetection's shape asserts and torch's
    broadcasting RuntimeError both."""


class BackendError(RuntimeError):
    """A backend could not compile or run a kernel (the dump folder holds the compiler log)."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log
