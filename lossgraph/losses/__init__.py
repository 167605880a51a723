"""MMDetection 3.3.0's losses, written as plain math with the public register_loss mechanism."""
from . import cross_entropy, focal, gaussian_focal, regression, varifocal  # noqa: F401
from . import iou  # noqa: F401
