"""Build the one extension module, pyengine._C, by driving CMakeLists.txt.

Environment:
  PYENGINE_CUDA=0      do not build CUDA kernels even where nvcc is found
  PYENGINE_BUILD_TYPE  CMake build type (default Release)
  PYENGINE_CMAKE_ARGS  extra arguments passed to CMake
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("PYENGINE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYENGINE_CUDA={'OFF' if os.environ.get('PYENGINE_CUDA', '1') == '0' else 'AUTO'}",
            "-DPYENGINE_BUILD_TESTS=OFF",
        ]
        args += shlex.split(os.environ.get("PYENGINE_CMAKE_ARGS", ""))
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", ".", "--target", "_C", "-j", jobs], cwd=build_dir)


setup(ext_modules=[CMakeExtension("pyengine._C")], cmdclass={"build_ext": CMakeBuild})
