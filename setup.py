"""Builds the process plugin's native namespace init with the package (pyproject.toml has the rest).

``plugins/process/nsinit.c`` becomes the executable ``cedana_ray/plugins/process/nsinit``:
in the source tree for an editable install, in the wheel otherwise (``py3-none-linux_*``).
Statically linked where the C library allows, so that it runs on any Linux of the
same architecture (the GPU check carries it to a machine without a compiler).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

SOURCE = Path("plugins/process/nsinit.c")
FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]


def compile_nsinit(target: Path) -> None:
    cc = shlex.split(os.environ.get("CC", "cc"))
    target.parent.mkdir(parents=True, exist_ok=True)
    for link in (["-static"], []):  # a C library without a static archive: dynamic
        done = subprocess.run([*cc, *FLAGS, *link, "-o", str(target), str(SOURCE)], capture_output=True, text=True)
        if done.returncode == 0:
            return
    raise SystemExit(f"cedana-ray: cannot compile {SOURCE} with {cc[0]} (a C compiler is needed):\n{done.stderr}")


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        package = SOURCE.parent if self.editable_mode else Path(self.build_lib, "cedana_ray/plugins/process")
        compile_nsinit(package / "nsinit")


class NativeDistribution(Distribution):
    def has_ext_modules(self) -> bool:  # a native executable inside: a platform wheel
        return True


class PlatformWheel(bdist_wheel):
    """``py3-none-PLATFORM``: no extension module, so any Python 3 of this platform."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", super().get_tag()[2]


setup(cmdclass={"build_py": BuildPy, "bdist_wheel": PlatformWheel}, distclass=NativeDistribution)
