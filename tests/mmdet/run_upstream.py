"""Run MMDetection's own loss tests (tests/test_models/test_losses/ of a v3.3.0 checkout)
unchanged: once with MMDetection's classes (the control) and once per lossgraph backend.

    python tests/mmdet/run_upstream.py MMDET_REPO [backend ...]      (default: torchscript cpp)

A test that fails with MMDetection's own classes too is reported as an upstream failure; any
other failure, including a loss lossgraph does not compile, fails this script.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTROL_CONFTEST = """import os, sys
sys.path.insert(0, os.environ["LOSSGRAPH_MMDET_SUPPORT"])
import mmcv_ext_standin
mmcv_ext_standin.install()
"""


def run(repo: Path, backend: str | None) -> tuple[set[str], int]:
    """(failed test ids, number of tests) of one session in a scratch copy."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        shutil.copytree(repo / "tests" / "test_models" / "test_losses",
                        scratch / "tests" / "test_models" / "test_losses")
        shutil.copytree(repo / "tests" / "data", scratch / "tests" / "data")
        if backend is None:
            (scratch / "conftest.py").write_text(CONTROL_CONFTEST)
        else:
            shutil.copy(HERE / "upstream_conftest.py", scratch / "conftest.py")
        env = dict(os.environ, LOSSGRAPH_MMDET_SUPPORT=str(HERE),
                   LOSSGRAPH_TEST_BACKEND=backend or "",
                   PYTHONPATH=os.pathsep.join([str(HERE.parent.parent),
                                               os.environ.get("PYTHONPATH", "")]))
        xml = scratch / "report.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", "tests"], cwd=scratch, env=env,
                              capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("lossgraph ("):
                print("  " + line)
        if not xml.exists():
            sys.exit(f"pytest did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        cases = ET.parse(xml).getroot().iter("testcase")
        failed, total = set(), 0
        for case in cases:
            total += 1
            if case.find("failure") is not None or case.find("error") is not None:
                failed.add(f"{case.get('classname')}::{case.get('name')}")
            if case.find("skipped") is not None:
                failed.add(f"{case.get('classname')}::{case.get('name')} (skipped)")
        return failed, total


def main() -> int:
    repo = Path(sys.argv[1])
    backends = sys.argv[2:] or ["torchscript", "cpp"]
    upstream, total = run(repo, None)
    print(f"MMDetection's own classes: {total - len(upstream)}/{total} pass; failing upstream too: "
          f"{sorted(upstream) or 'none'}")
    status = 0
    for backend in backends:
        failed, total = run(repo, backend)
        ours = sorted(failed - upstream)
        print(f"lossgraph {backend}: {total - len(failed)}/{total} pass, "
              f"{len(failed & upstream)} fail upstream too, {len(ours)} fail only with lossgraph")
        for name in ours:
            print(f"  FAILED {name}")
        status |= bool(ours)
    return status


if __name__ == "__main__":
    sys.exit(main())
