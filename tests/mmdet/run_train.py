"""MMDetection's tools/train.py, unchanged, with the mmcv._ext stand-in installed first.

    python tests/mmdet/run_train.py CONFIG --work-dir DIR     (the arguments of tools/train.py)
"""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # mmcv_ext_standin, ulp_hook (a config's custom_imports)

import mmcv_ext_standin  # noqa: E402

if __name__ == "__main__":
    mmcv_ext_standin.install()
    import mmdet
    tools = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "tools", "train.py")
    sys.argv[0] = tools
    runpy.run_path(tools, run_name="__main__")
