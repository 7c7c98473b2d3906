"""Time the quick test subset and regenerate tests/slow_tests.txt: the tests over `--threshold`
seconds move to the full suite, so `pytest -m "not slow"` stays under 5 minutes on 2 cores.

    .venv/bin/python experiments/bench_tests.py --threshold 5

Each test's time includes the compiles it triggers first; after regenerating, run the quick subset
again and check its wall time (later tests may inherit compiles from the ones moved out).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "slow_tests.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=5.0, help="seconds; slower tests are marked slow")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "quick.xml")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", f"--junitxml={xml}"], cwd=ROOT)
        wall = time.perf_counter() - t0
        rows = [(float(tc.get("time")), tc.get("classname").replace(".", "/") + ".py::" + tc.get("name"))
                for tc in ET.parse(xml).getroot().iter("testcase") if tc.find("skipped") is None]
    header = [line for line in LIST.read_text().splitlines() if line.startswith("#")]
    kept = [line for line in LIST.read_text().splitlines() if line and not line.startswith("#")]
    new = sorted(set(kept) | {name for t, name in rows if t > args.threshold})
    LIST.write_text("\n".join(header + new) + "\n")
    print(f"quick subset: {len(rows)} tests in {wall:.0f} s wall; {len(new)} tests listed as slow in {LIST}")


if __name__ == "__main__":
    main()
