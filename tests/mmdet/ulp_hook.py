"""The control run's hook: move every initial weight, and the network's input at every step, one
float ulp up.

Two runs that differ only by this show how far float rounding alone moves the per-step losses;
lossgraph's run must stay within that drift of MMDetection's.
"""
import torch
from mmdet.registry import HOOKS
from mmengine.hooks import Hook


@HOOKS.register_module()
class UlpPerturbHook(Hook):
    """before_train: p = nextafter(p, +inf) for every floating parameter of the model, and the
    same for the (normalized) images the backbone receives at every step."""

    def before_train(self, runner) -> None:
        model = getattr(runner.model, "module", runner.model)
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.copy_(_up(p))
        model.backbone.register_forward_pre_hook(lambda module, args: (_up(args[0]),) + args[1:])


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, float("inf")))
