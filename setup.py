"""Builds the Cython codec. Switches (environment variables, as asyncpg's setup.py has):

RESONANT_DEBUG=1      compile with -O0 -g and Cython's bounds checks on
RESONANT_ANNOTATE=1   write the Cython HTML annotation next to the sources: resonant/_codec.html and one
                      resonant/_NAME.html per included file (_decode.html, _session_core.html, ...)
RESONANT_LINETRACE=1  enable line tracing for coverage of the Cython code
"""

import glob
import os
import platform
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("RESONANT_DEBUG") == "1"
annotate = os.environ.get("RESONANT_ANNOTATE") == "1"
linetrace = os.environ.get("RESONANT_LINETRACE") == "1"

directives = {"language_level": "3"}
macros = []
if debug:
    directives.update(boundscheck=True, wraparound=True)
if linetrace:
    directives.update(linetrace=True, binding=True)
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

compile_args = ["-O0", "-g"] if debug else ["-O3"]
libraries = ["dl"] if sys.platform.startswith("linux") else []

# xxHash (BSD-2-Clause), vendored from python-xxhash's sdist and compiled in: the xxh3_64 backend
# (resonant/_backends.pxi, docs/backends.md). On x86-64 its dispatcher picks the SSE2/AVX2/AVX-512
# kernel at run time, so the build needs no -m flags. Hidden visibility keeps its symbols ours.
XXH_DIR = "resonant/vendor/xxhash"
sources = ["resonant/_codec.pyx", f"{XXH_DIR}/xxhash.c"]
if platform.machine().lower() in ("x86_64", "amd64") and sys.maxsize > 2**32:
    sources.append(f"{XXH_DIR}/xxh_x86dispatch.c")
    macros.append(("RZ_XXH_X86_DISPATCH", "1"))
if sys.platform != "win32":
    compile_args.append("-fvisibility=hidden")

extensions = [
    Extension(
        "resonant._codec",
        sources,
        depends=sorted(glob.glob("resonant/_*.pxi") + glob.glob("resonant/_*.pxd") + glob.glob(f"{XXH_DIR}/*.h")),
        extra_compile_args=compile_args,
        include_dirs=[numpy.get_include(), XXH_DIR],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"), *macros],
        libraries=libraries,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=annotate,
        force=annotate or debug,  # Cython writes the annotation (one .html per .pyx/.pxi) only when it runs
    )
)
