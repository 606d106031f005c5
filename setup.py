"""Builds the Cython codec. Switches (environment variables, as asyncpg's setup.py has):

RESONANT_DEBUG=1      compile with -O0 -g and Cython's bounds checks on
RESONANT_ANNOTATE=1   write the Cython HTML annotation next to the sources: resonant/_codec.html and one
                      resonant/_NAME.html per included file (_decode.html, _session_core.html, ...)
RESONANT_LINETRACE=1  enable line tracing for coverage of the Cython code
"""

import glob
import os
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

extensions = [
    Extension(
        "resonant._codec",
        ["resonant/_codec.pyx"],
        depends=sorted(glob.glob("resonant/_*.pxi") + glob.glob("resonant/_*.pxd")),
        extra_compile_args=compile_args,
        include_dirs=[numpy.get_include()],
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
