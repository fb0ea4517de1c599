"""Builds the optional extension ``fimfast._C`` from ``csrc/``.

* C++ CPU ops (``csrc/*.cpp``, ``csrc/cpu/*.cpp``): built wherever a C++ compiler exists.
* CUDA ops (``csrc/cuda/*.cu`` and their torch bindings ``csrc/cuda/*_binding.cpp``): built only
  when a CUDA toolkit and a CUDA build of torch are present, or when ``FIMFAST_BUILD_CUDA=1``
  (``FIMFAST_BUILD_CUDA=0`` never builds them).
* ``FIMFAST_BUILD_EXT=0`` builds no extension at all (a pure-Python package on the torch backend).

The extension is compiled against the torch that is installed, like the field's other extension
libraries: install with ``pip install --no-build-isolation .`` (build isolation would hide that
torch). The torch version it was built against is written beside it (``fimfast/_build_info.py``);
``fimfast._ext`` refuses an extension built for another torch and uses the torch backend.

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
    if os.environ.get("FIMFAST_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
        print("fimfast: FIMFAST_BUILD_EXT=0, not building fimfast._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch at build time: install the pure-Python package
        print(
            f"fimfast: not building fimfast._C: torch is not importable here ({exc}). To build "
            "it against your torch, install with `pip install --no-build-isolation .`",
            file=sys.stderr,
        )
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

    def record(self, built, cuda: bool) -> None:
        """Write ``_build_info.py`` beside the built extension: the torch it links against."""
        path = os.path.join(os.path.dirname(self.get_ext_fullpath(built.name)), "_build_info.py")
        with open(path, "w") as f:
            f.write(
                '"""Written by setup.py when fimfast._C was built (see fimfast/_ext.py)."""\n\n'
                f"TORCH_VERSION = {torch.__version__!r}\n"
                f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
                f"WITH_CUDA = {cuda!r}\n"
            )
        print(f"fimfast: fimfast._C built against torch {torch.__version__}", file=sys.stderr)

    class OptionalBuildExt(build_ext):
        """Build the extension; if the CUDA build fails, the CPU-only one; else go on without.
        The build record goes wherever the extension goes (wheel, ``--inplace``, editable)."""

        def _record_pair(self):
            build_py = self.get_finalized_command("build_py")
            inplace, regular = self._get_inplace_equivalent(build_py, cpu_ext)
            name = "_build_info.py"
            return (os.path.join(os.path.dirname(regular), name),
                    os.path.join(os.path.dirname(inplace), name))

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            regular, inplace = self._record_pair()
            if os.path.exists(regular):
                self.copy_file(regular, inplace, level=self.verbose)

        def get_output_mapping(self):
            mapping = super().get_output_mapping()
            if self.inplace:
                regular, inplace = self._record_pair()
                mapping[regular] = inplace
            return mapping

        def run(self):
            try:
                super().run()
            except Exception as exc:
                print(f"fimfast: building fimfast._C failed, continuing without it: {exc}",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                record(self, ext, ext is not cpu_ext)
                return
            except Exception as exc:
                print(f"fimfast: building {ext.name} failed: {exc}", file=sys.stderr)
            if ext is cpu_ext:
                print("fimfast: continuing without fimfast._C", file=sys.stderr)
                return
            print("fimfast: building fimfast._C without its CUDA kernels", file=sys.stderr)
            try:
                super().build_extension(cpu_ext)
                record(self, cpu_ext, False)
            except Exception as exc:
                print(f"fimfast: building fimfast._C failed, continuing without it: {exc}",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
