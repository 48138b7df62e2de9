"""Builds the process plugin's native namespace init with the package (pyproject.toml has the rest).

``plugins/process/nsinit.c`` becomes the executable ``cedana_ray/plugins/process/nsinit``:
in the source tree for an editable install, in the wheel otherwise. Statically linked where
the C library allows, so that it runs on any Linux of the same architecture (the GPU check
carries it to a machine without a compiler); the wheel is then tagged manylinux
(``py3-none-manylinux_2_17_ARCH.manylinux2014_ARCH``), which a package index accepts.
Linked dynamically it keeps the plain ``py3-none-linux_ARCH`` tag: it then needs this
machine's C library (its symbol versions), which may be newer than a manylinux baseline.
"""

from __future__ import annotations

import os
import shlex
import struct
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

SOURCE = Path("plugins/process/nsinit.c")
NSINIT = Path("cedana_ray/plugins/process/nsinit")  # in the wheel
FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]


# What the wheel claims when nsinit is static: the manylinux2014 baseline (glibc 2.17), under
# its PEP 600 name and its legacy alias, so that pip of any age installs it. A static
# executable needs no library of the target at all, so any such baseline is honest.
MANYLINUX = "manylinux_2_17_{arch}.manylinux2014_{arch}"
PT_INTERP = 3  # the ELF program header that names a dynamic loader


def compile_nsinit(target: Path) -> None:
    cc = shlex.split(os.environ.get("CC", "cc"))
    target.parent.mkdir(parents=True, exist_ok=True)
    for link in (["-static"], []):  # a C library without a static archive: dynamic
        done = subprocess.run([*cc, *FLAGS, *link, "-o", str(target), str(SOURCE)], capture_output=True, text=True)
        if done.returncode == 0:
            return
    raise SystemExit(f"cedana-ray: cannot compile {SOURCE} with {cc[0]} (a C compiler is needed):\n{done.stderr}")


def is_static(executable: Path) -> bool:
    """Whether the ELF ``executable`` runs without a dynamic loader (no PT_INTERP header):
    statically linked, so it needs nothing of the machine it runs on but the kernel."""
    data = executable.read_bytes()
    if data[:4] != b"\x7fELF":
        return False
    order = "<" if data[5] == 1 else ">"  # ELFDATA2LSB
    offset, at, sizes_at = ("Q", 32, 54) if data[4] == 2 else ("I", 28, 42)  # ELFCLASS64, else 32
    phoff = struct.unpack_from(order + offset, data, at)[0]
    phentsize, phnum = struct.unpack_from(order + "HH", data, sizes_at)
    kinds = {struct.unpack_from(order + "I", data, phoff + i * phentsize)[0] for i in range(phnum)}
    return PT_INTERP not in kinds


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        compile_nsinit(SOURCE.with_suffix("") if self.editable_mode else Path(self.build_lib, NSINIT))


class NativeDistribution(Distribution):
    def has_ext_modules(self) -> bool:  # a native executable inside: a platform wheel
        return True


class PlatformWheel(bdist_wheel):
    """``py3-none-PLATFORM``: no extension module, so any Python 3 of this platform;
    PLATFORM is manylinux when the nsinit built into the wheel is static (see above)."""

    def get_tag(self) -> tuple[str, str, str]:
        platform = super().get_tag()[2]
        places = (self.bdist_dir, self.get_finalized_command("build_py").build_lib)  # installed, built
        built = next((p for p in (Path(d, NSINIT) for d in places if d) if p.exists()), None)
        if platform.startswith("linux_") and built and is_static(built):
            return "py3", "none", MANYLINUX.format(arch=platform.removeprefix("linux_"))
        return "py3", "none", platform  # dynamic: it needs this machine's C library


setup(cmdclass={"build_py": BuildPy, "bdist_wheel": PlatformWheel}, distclass=NativeDistribution)
