"""Build of the optional C++ extension iis_fast._C (fused CPU kernels, csrc/). Metadata lives in pyproject.toml.

Flags: -O3 -fopenmp -ffp-contract=off (the kernels use explicit FMA intrinsics; elementwise ops keep torch's
rounding) and, by default, -march=native. Set IIS_FAST_ARCH to build a portable binary, e.g.
IIS_FAST_ARCH=x86-64-v3 (AVX2/FMA) or IIS_FAST_ARCH=none (no -march flag: scalar fallback kernels).
Set IIS_FAST_NO_EXT=1 to skip the extension entirely (the package then runs on its torch backends).
"""
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("IIS_FAST_NO_EXT", "") not in ("1", "true", "yes"):
    from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag

    class BuildExt(build_ext):
        def build_extensions(self):
            arch = os.environ.get("IIS_FAST_ARCH", "native")
            extra = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
            if arch not in ("", "none"):
                flag = f"-march={arch}"
                if has_flag(self.compiler, flag):
                    extra.append(flag)
                else:
                    print(f"iis_fast: compiler does not accept {flag}; building without it", file=sys.stderr)
            link = []
            if has_flag(self.compiler, "-fopenmp"):
                extra.append("-fopenmp")
                link.append("-fopenmp")
            else:
                print("iis_fast: no OpenMP; the C++ kernels will run on one thread", file=sys.stderr)
            for ext in self.extensions:
                ext.extra_compile_args = list(ext.extra_compile_args) + extra
                ext.extra_link_args = list(ext.extra_link_args) + link
            super().build_extensions()

    ext_modules = [
        Pybind11Extension(
            "iis_fast._C",
            ["csrc/grid.cpp"],
            depends=["csrc/gemm.h", "csrc/narrow.h"],
            cxx_std=17,
        )
    ]
    cmdclass = {"build_ext": BuildExt}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
