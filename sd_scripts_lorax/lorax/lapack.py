"""Two LAPACK/BLAS routines from scipy's own library, called so that the GIL is released.

scipy's Python wrappers (`scipy.linalg.eigh`, `scipy.linalg.blas.dsyrk`) hold the GIL for the whole
call, so bases computed on several worker threads would run one at a time. The same routines are
exported as C function pointers by `scipy.linalg.cython_lapack` / `cython_blas`; calling those
through ctypes releases the GIL. Arrays are float64 or float32 numpy arrays in C order (the
d- or s- routine is picked by dtype), seen by Fortran as their transposes.

- `gram_upper(a, small_side_is_u)`: the Gram matrix of a (out, n) matrix by dsyrk (half the flops of
  a matmul), as an (m, m) Fortran-ordered array whose upper triangle is valid, m = min(out, n).
- `top_eigh(g, r)`: the r largest eigenpairs of that matrix by dsyevr/ssyevr (MRRR: only the wanted
  eigenvectors are computed), eigenvalues ascending, as scipy.linalg.eigh(subset_by_index=...) gives.
- `serial_blas()`: that library on one thread while any caller is inside.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator

import numpy as np


@lru_cache(maxsize=None)
def _routine(module: str, name: str, n_args: int):
    """The C function `name` of scipy's cython_lapack/cython_blas, callable through ctypes (releases the GIL)."""
    import importlib

    capsule = importlib.import_module(f"scipy.linalg.{module}").__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    # every argument is a pointer (Fortran convention); void return
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * n_args))(address)


def _int(v: int) -> ctypes.c_int:
    return ctypes.c_int(int(v))


def _ptr(x) -> int:
    if isinstance(x, np.ndarray):
        return x.ctypes.data
    return ctypes.addressof(x)


_SCALAR = {np.dtype(np.float64): ("d", ctypes.c_double), np.dtype(np.float32): ("s", ctypes.c_float)}


def _kind(x: np.ndarray, what: str) -> tuple[str, type]:
    if x.dtype not in _SCALAR:
        raise ValueError(f"{what}: expected float64 or float32, got {x.dtype}")
    return _SCALAR[x.dtype]


def gram_upper(a: np.ndarray, small_side_is_u: bool) -> np.ndarray:
    """Upper triangle (Fortran order, a's dtype) of a a^T (small_side_is_u) or a^T a, for a C-ordered
    float64/float32 (out, n)."""
    prefix, scalar = _kind(a, "gram_upper")
    if not a.flags.c_contiguous:
        raise ValueError("gram_upper: expected a C-contiguous matrix")
    out, n = a.shape
    m = out if small_side_is_u else n
    g = np.zeros((m, m), dtype=a.dtype, order="F")
    # Fortran sees `a` as at = a^T (n x out, lda = n): a a^T = at^T at ("T"), a^T a = at at^T ("N")
    trans = b"T" if small_side_is_u else b"N"
    k = n if small_side_is_u else out
    uplo, tr = ctypes.c_char(b"U"), ctypes.c_char(trans)
    n_, k_, lda, ldc = _int(m), _int(k), _int(max(1, n)), _int(max(1, m))
    alpha, beta = scalar(1.0), scalar(0.0)
    syrk = _routine("cython_blas", f"{prefix}syrk", 10)
    syrk(_ptr(uplo), _ptr(tr), _ptr(n_), _ptr(k_), _ptr(alpha), _ptr(a), _ptr(lda), _ptr(beta), _ptr(g), _ptr(ldc))
    return g


def top_eigh(g: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The r largest eigenpairs of the symmetric (m, m) Fortran-ordered `g` (upper triangle used;
    overwritten). Returns (eigenvalues ascending (r,), eigenvectors (m, r))."""
    m = g.shape[0]
    prefix, scalar = _kind(g, "top_eigh")
    if g.shape != (m, m) or not g.flags.f_contiguous:
        raise ValueError("top_eigh: expected a Fortran-ordered square matrix")
    if not 0 < r <= m:
        raise ValueError(f"top_eigh: r must be in 1..{m}, got {r}")
    syevr = _routine("cython_lapack", f"{prefix}syevr", 21)
    jobz, rng, uplo = ctypes.c_char(b"V"), ctypes.c_char(b"I"), ctypes.c_char(b"U")
    n_, lda, il, iu, ldz = _int(m), _int(m), _int(m - r + 1), _int(m), _int(m)
    vl, vu, abstol = scalar(0.0), scalar(0.0), scalar(0.0)
    found, info = ctypes.c_int(0), ctypes.c_int(0)
    w = np.zeros(m, dtype=g.dtype)
    z = np.zeros((r, m), dtype=g.dtype)             # Fortran (m, r), ldz = m
    isuppz = np.zeros(2 * max(1, r), dtype=np.int32)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        lw, liw = _int(lwork), _int(liwork)  # named: ctypes objects must outlive the call
        syevr(_ptr(jobz), _ptr(rng), _ptr(uplo), _ptr(n_), _ptr(g), _ptr(lda), _ptr(vl), _ptr(vu), _ptr(il),
              _ptr(iu), _ptr(abstol), _ptr(found), _ptr(w), _ptr(z), _ptr(ldz), _ptr(isuppz), _ptr(work),
              _ptr(lw), _ptr(iwork), _ptr(liw), _ptr(info))

    work, iwork = np.zeros(1, dtype=g.dtype), np.zeros(1, dtype=np.int32)
    call(work, -1, iwork, -1)                         # workspace query
    lwork, liwork = int(work[0]), int(iwork[0])
    work, iwork = np.zeros(max(1, lwork), dtype=g.dtype), np.zeros(max(1, liwork), dtype=np.int32)
    call(work, lwork, iwork, liwork)
    if info.value != 0 or found.value != r:
        raise np.linalg.LinAlgError(f"{prefix}syevr failed (info {info.value}, {found.value} of {r} eigenpairs)")
    return w[:r].copy(), z.T.copy()


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limits = None
_controller = None


@contextmanager
def serial_blas() -> Iterator[None]:
    """Run scipy's (OpenBLAS) LAPACK on one thread while any caller is inside: on a shared 2-core
    machine its threaded factorizations are 10-100x slower than serial ones (see bases.serial_lapack).
    Reference-counted, so worker threads computing bases side by side share one limit and the last
    one out restores the library's own setting.

    Callers that compute bases on several threads must hold this around their whole pool: if the
    limit came and went with each call, OpenBLAS would start its own threads in between, and their
    spin-waits next to the workers make every call 20-50x slower on a busy machine (measured).
    """
    global _blas_users, _blas_limits, _controller
    with _blas_lock:
        if _blas_users == 0:
            if _controller is None:
                # finding the loaded BLAS libraries walks every shared object: once, and after
                # scipy's own library is loaded (a controller made before would not see it)
                import scipy.linalg.cython_blas  # noqa: F401
                import scipy.linalg.cython_lapack  # noqa: F401
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
            _blas_limits = _controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limits is not None:
                _blas_limits.restore_original_limits()
                _blas_limits = None
