"""Check the machine has what hyperrec needs before anything is installed.

Runs with the system interpreter (standard library only): ``python3 hyperrec/prereqs.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

MIN_PYTHON = (3, 11)
MIN_JAVA = 17


def java_major() -> int | None:
    java = shutil.which("java")
    if java is None:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major


def problems() -> list[str]:
    found = []
    if sys.version_info < MIN_PYTHON:
        found.append(
            f"Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ not found (this is {sys.version.split()[0]}): install python3.11"
        )
    major = java_major()
    if major is None or major < MIN_JAVA:
        have = "no java on PATH" if major is None else f"found Java {major}"
        found.append(f"Java {MIN_JAVA}+ not found ({have}): install openjdk-17-jre")
    return found


def main() -> int:
    issues = problems()
    for line in issues:
        print(f"hyperrec: {line}", file=sys.stderr)
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
