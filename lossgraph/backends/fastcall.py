"""Native calls without ctypes' per-call work: METH_FASTCALL trampolines for the cpp kernels and
the helper library's checks.

Note [Fast calls]: a ctypes call converts each argument through its argtypes' from_param, builds
a libffi call frame and checks errno and the result: ~13,000 x86 instructions for a kernel's 10
arguments (callgrind, Python 3.11), more than the kernel's own work on a tiny call (FocalLoss
8 x 80: ~10,000), and ~7,000 for the 4-argument label check. A builtin function taking the same
arguments as a vector of Python objects, converting each with PyLong_AsVoidPtr /
PyFloat_AsDouble and calling the function pointer with the kernel's C signature, costs a few
hundred. The trampolines are compiled once per interpreter ABI (the version and SOABI are part of
the source, so of its hash) into a library cached and verified like a kernel (Note [Cache
trust]); the pointer called is one that ctypes found in a library loaded from verified bytes,
and the arguments are the ones ctypes would get. Without Python.h, or when the library does not
build, the ctypes function is used unchanged: only the speed differs. The kernel runs with the
GIL released, as under ctypes.
"""
from __future__ import annotations

import ctypes
import functools
import sys
import sysconfig
from pathlib import Path

MAX_POINTERS = 12   # kernels with more tensor arguments keep ctypes

SOURCE = r"""
/* lossgraph fast calls for Python %(version)s, ABI %(soabi)s */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef long long ll;
static void* lg_ptr(PyObject* o) { return o == Py_None ? NULL : PyLong_AsVoidPtr(o); }

#define V void*
#define KSIG(...) void (*)(__VA_ARGS__, double, ll, ll, void*, void*, int)
#define TAIL d, R, K, lo, go, th

/* launch(fn, p_0, ..., p_n-1, denom, R, K, loss, grad, threads): a cpp kernel */
static PyObject* lg_launch(PyObject* self, PyObject* const* a, Py_ssize_t na) {
  Py_ssize_t n = na - 7;
  if (n < 1 || n > %(max)d) {
    PyErr_SetString(PyExc_TypeError, "lossgraph fast call: wrong number of kernel arguments");
    return NULL;
  }
  void* fn = lg_ptr(a[0]);
  void* p[%(max)d];
  for (Py_ssize_t i = 0; i < n; i++) p[i] = lg_ptr(a[1 + i]);
  double d = PyFloat_AsDouble(a[n + 1]);
  ll R = PyLong_AsLongLong(a[n + 2]), K = PyLong_AsLongLong(a[n + 3]);
  void* lo = lg_ptr(a[n + 4]);
  void* go = lg_ptr(a[n + 5]);
  int th = (int)PyLong_AsLong(a[n + 6]);
  if (PyErr_Occurred()) return NULL;
  if (fn == NULL) {
    PyErr_SetString(PyExc_ValueError, "lossgraph fast call: null kernel");
    return NULL;
  }
  Py_BEGIN_ALLOW_THREADS
  switch (n) {
%(cases)s
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

/* check(fn, p, n, lo, hi) -> int: the helper library's int f(void*, ll, ll, ll) */
static PyObject* lg_check(PyObject* self, PyObject* const* a, Py_ssize_t na) {
  if (na != 5) {
    PyErr_SetString(PyExc_TypeError, "lossgraph fast call: check takes 5 arguments");
    return NULL;
  }
  void* fn = lg_ptr(a[0]);
  void* p = lg_ptr(a[1]);
  ll n = PyLong_AsLongLong(a[2]), lo = PyLong_AsLongLong(a[3]), hi = PyLong_AsLongLong(a[4]);
  if (PyErr_Occurred()) return NULL;
  if (fn == NULL) {
    PyErr_SetString(PyExc_ValueError, "lossgraph fast call: null function");
    return NULL;
  }
  return PyLong_FromLong(((int (*)(void*, ll, ll, ll))fn)(p, n, lo, hi));
}

static PyMethodDef lg_defs[] = {
  {"launch", (PyCFunction)(void (*)(void))lg_launch, METH_FASTCALL, "a cpp kernel"},
  {"check", (PyCFunction)(void (*)(void))lg_check, METH_FASTCALL, "a range check"},
};

PyObject* lg_fastcall_functions(void) {
  return Py_BuildValue("(NN)", PyCFunction_New(&lg_defs[0], NULL),
                       PyCFunction_New(&lg_defs[1], NULL));
}
"""


def source() -> str:
    """The trampolines' C source for this interpreter."""
    cases = []
    for n in range(1, MAX_POINTERS + 1):
        sig = ", ".join(["V"] * n)
        args = ", ".join(f"p[{i}]" for i in range(n))
        cases.append(f"    case {n}: (({'KSIG'}({sig}))fn)({args}, TAIL); break;")
    return SOURCE % {"version": sys.version.split()[0], "soabi": sysconfig.get_config_var("SOABI"),
                     "max": MAX_POINTERS, "cases": "\n".join(cases)}


def _include() -> Path | None:
    inc = sysconfig.get_paths().get("include")
    return Path(inc) if inc and (Path(inc) / "Python.h").is_file() else None


@functools.lru_cache(maxsize=None)
def functions():
    """(launch, check) builtins, or None where they cannot be built (no Python.h, no compiler)."""
    from .. import cache
    from ..errors import BackendError
    from . import cpp, elf
    inc = _include()
    if inc is None or not cpp.available("cpu"):
        return None
    try:
        _, data = cpp.library(source(), cache.cache_dir() / "cpp" / "fastcall", "fastcall",
                              flags=(f"-I{inc}",))
        lib = elf.dlopen(data)
        make = ctypes.PYFUNCTYPE(ctypes.py_object)(("lg_fastcall_functions", lib))
        return make()
    except (BackendError, OSError, AttributeError):
        return None


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def kernel(fn, n_pointers: int):
    """fn (a ctypes kernel of n_pointers tensor arguments) as a fast call with the same
    arguments, or fn itself (Note [Fast calls])."""
    got = functions() if n_pointers <= MAX_POINTERS else None
    if got is None:
        return fn
    return functools.partial(got[0], _address(fn))


def check(fn):
    """fn (a ctypes int f(void*, ll, ll, ll) of the helper library) as a fast call."""
    got = functions()
    if got is None:
        return fn
    return functools.partial(got[1], _address(fn))
