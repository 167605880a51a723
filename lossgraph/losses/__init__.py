"""MMDetection 3.3.0's losses, written as plain math with the public register_loss mechanism."""
from . import cross_entropy, focal, gaussian_focal, regression, varifocal  # noqa: F401
from . import dice, gfocal, iou, kd  # noqa: F401
from . import ghm, seesaw  # noqa: F401
from . import l2, multipos  # noqa: F401
from . import ae, eqlv2, triplet  # noqa: F401
