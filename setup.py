"""Builds the optional extension ``fimfast._C`` from ``csrc/``.

* C++ CPU ops (``csrc/*.cpp``, ``csrc/cpu/*.cpp``): built wherever a C++ compiler exists.
* CUDA ops (``csrc/cuda/*.cu`` and their torch bindings ``csrc/cuda/*_binding.cpp``): built only
  when a CUDA toolkit and a CUDA build of torch are present, or when ``FIMFAST_BUILD_CUDA=1``
  (``FIMFAST_BUILD_CUDA=0`` never builds them).

A failed or impossible build is reported and skipped: fimfast installs and runs on its torch
backend without the extension. Nothing here needs the network.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    cpp = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch at build time: install the pure-Python package
        print(f"fimfast: not building fimfast._C ({exc})", file=sys.stderr)
        return [], {}
    flag = os.environ.get("FIMFAST_BUILD_CUDA", "auto").strip().lower()
    cuda_ok = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    with_cuda = flag in ("1", "true", "yes", "on") or (flag == "auto" and cuda_ok)
    include = [os.path.join(ROOT, "csrc", d) for d in ("include", "cpu", "cuda")]
    # -fno-math-errno and -fno-trapping-math let sqrt, max and selects vectorise; -fopenmp makes
    # at::parallel_for use torch's OpenMP threads (without it the header-only loop runs serially)
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    cpu_ext = cpp_extension.CppExtension(
        "fimfast._C", cpp, include_dirs=include, extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    ext = cpu_ext
    if with_cuda:
        cu = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_binding.cpp")
        ext = cpp_extension.CUDAExtension(
            "fimfast._C", cpp + cu, include_dirs=include, define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link,
        )
    build_ext = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)

    class OptionalBuildExt(build_ext):
        """Build the extension; if the CUDA build fails, the CPU-only one; else go on without."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                print(f"fimfast: building fimfast._C failed, continuing without it: {exc}",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as exc:
                print(f"fimfast: building {ext.name} failed: {exc}", file=sys.stderr)
            if ext is cpu_ext:
                print("fimfast: continuing without fimfast._C", file=sys.stderr)
                return
            print("fimfast: building fimfast._C without its CUDA kernels", file=sys.stderr)
            try:
                super().build_extension(cpu_ext)
            except Exception as exc:
                print(f"fimfast: building fimfast._C failed, continuing without it: {exc}",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
