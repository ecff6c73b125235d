"""Build of the C++ kernels (csrc/) and the package layout. Metadata and dependencies live in pyproject.toml.

The kernels are compiled once per CPU level, each into its own extension module, and
:mod:`iis_fast.backends.cpu_level` picks the best one the running CPU supports at import time, so a wheel built
on one machine runs on any x86-64 machine (and on other architectures with the portable build):

- ``iis_fast._C_avx2``: ``-march=x86-64-v3`` (AVX2, FMA, BMI2: the vectorised kernels);
- ``iis_fast._C_base``: the baseline of the target (x86-64 or any other architecture; scalar kernels).

Flags common to both: -O3 -fopenmp -ffp-contract=off (the kernels use explicit FMA intrinsics; elementwise ops
keep torch's rounding). Set IIS_FAST_NO_EXT=1 to skip the extension (the package then runs its torch backends).

The Triton kernels live in the repository's top-level ``kernels/`` folder and install as ``iis_fast.kernels``,
so nothing but ``iis_fast`` is installed at the top level.
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["iis_fast", "iis_fast.*"]) + ["iis_fast.kernels"]
package_dir = {"iis_fast.kernels": "kernels"}

#: (module suffix, compiler flags) per CPU level; the C++ sources pick their kernels from the predefined macros.
#: One translation unit, csrc/bindings.cpp, includes the kernel headers (csrc/*.h, docs/kernels_cpu.md).
X86_LEVELS = [("avx2", ["-march=x86-64-v3"]), ("base", ["-march=x86-64", "-mtune=generic"])]

ext_modules = []
cmdclass = {}
if os.environ.get("IIS_FAST_NO_EXT", "") not in ("1", "true", "yes"):
    from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    levels = X86_LEVELS if x86 else [("base", [])]

    class BuildExt(build_ext):
        def build_extensions(self):
            common = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
            link = []
            if has_flag(self.compiler, "-fopenmp"):
                common.append("-fopenmp")
                link.append("-fopenmp")
            else:
                print("iis_fast: no OpenMP; the C++ kernels will run on one thread", file=sys.stderr)
            for ext in self.extensions:
                ext.extra_compile_args = list(ext.extra_compile_args) + common
                ext.extra_link_args = list(ext.extra_link_args) + link
            super().build_extensions()

    for suffix, flags in levels:
        ext_modules.append(
            Pybind11Extension(
                f"iis_fast._C_{suffix}",
                ["csrc/bindings.cpp"],
                depends=sorted(glob.glob("csrc/*.h")),
                define_macros=[("IIS_FAST_MODULE", f"_C_{suffix}")],
                extra_compile_args=flags,
                cxx_std=17,
            )
        )
    cmdclass = {"build_ext": BuildExt}

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
