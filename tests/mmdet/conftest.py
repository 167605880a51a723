"""The optional MMDetection job's tests (marker `mmdet`): collected only where mmdet and mmengine
are installed, so the default suite neither needs them nor reports them as skipped."""
import importlib.util
import os
import sys

if importlib.util.find_spec("mmdet") is None or importlib.util.find_spec("mmengine") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import mmcv_ext_standin

    if importlib.util.find_spec("mmcv") is not None:
        try:
            import mmcv._ext  # noqa: F401   full mmcv: its own compiled ops
        except ImportError:
            mmcv_ext_standin.install()
