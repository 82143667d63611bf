"""A thin SVD that is safe on every backend, differentiable, for KD-SVD.

Why not ``jnp.linalg.svd`` everywhere: jaxlib before 0.11 runs a batched LAPACK call on XLA:CPU as a
ParallelBatchMap over the intra-op thread pool that the call itself is running on, and blocks waiting for it; when
as many such calls run at once as the pool has threads (two on a 2-core machine: the student's and the teacher's
SVDs of one step) the process deadlocks (seen with jax 0.10.2 in lapack_sgesdd_ffi -> ParallelBatchMap ->
BlockingCounter::Wait; a KD-SVD run stopped at its second step). On CPU the decomposition therefore runs in NumPy
(its own LAPACK, ``gesdd`` in float64, outside XLA's pool) through ``jax.pure_callback``; other backends keep
``jnp.linalg.svd`` (cuSOLVER on GPUs). ``jax.lax.platform_dependent`` picks the branch when the program is lowered.

The derivative is the standard one of the thin SVD, written as a ``custom_jvp`` on (s, V) so that it holds
whichever branch computed the factors: with A = U diag(s) V^T (A: [m, n], r = min(m, n)) and dP = U^T dA V,

    ds = diag(dP)
    dV = V (F * (diag(s) dP + dP^T diag(s))) + (I - V V^T) dA^T U diag(1/s)      (the last term only when n > m)

with F[i, j] = 1 / (s_j² - s_i²) off the diagonal and 0 on it (tests/test_kdsvd.py checks it against
``jnp.linalg.svd``'s own derivative). Like it, the derivative is not finite at repeated or zero singular values.

Singular vectors have no canonical sign: each is whatever the library returns, and LAPACK builds (NumPy's
OpenBLAS, PyTorch's MKL) and cuSOLVER choose differently for some matrices (docs/fidelity.md, KD-SVD).
"""
import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl


_BLAS = None


def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries, made once, when a program with the callback is traced (in
    the tracing thread: the callback itself then only sets a thread count, never inspects libraries)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = threadpoolctl.ThreadpoolController()
    return _BLAS


def _one_blas_thread():
    """A context in which NumPy's BLAS runs on one thread: its threads would compete with XLA's for these small
    matrices (on a busy 2-core machine a [64, 1024, 16] SVD took 10 s with them, 0.15 s without)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _numpy_svd(a):
    with _one_blas_thread():
        u, s, vh = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return u.astype(a.dtype), s.astype(a.dtype), vh.astype(a.dtype)


def _host_svd(a):
    """NumPy's thin SVD of ``[..., m, n]`` on the host (batched natively: one call for the whole batch)."""
    _blas_controller()
    m, n = a.shape[-2:]
    r = min(m, n)
    shapes = (jax.ShapeDtypeStruct(a.shape[:-2] + (m, r), a.dtype), jax.ShapeDtypeStruct(a.shape[:-2] + (r,), a.dtype),
              jax.ShapeDtypeStruct(a.shape[:-2] + (r, n), a.dtype))
    return jax.pure_callback(_numpy_svd, shapes, a, vmap_method="broadcast_all")


def _device_svd(a):
    return tuple(jnp.linalg.svd(a, full_matrices=False))


def thin_svd(a):
    """(U ``[..., m, r]``, s ``[..., r]``, V^T ``[..., r, n]``) of ``a``: NumPy's on CPU, the backend's elsewhere."""
    return jax.lax.platform_dependent(a, cpu=_host_svd, default=_device_svd)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def _mm(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


@jax.custom_jvp
def singular_values_and_right_vectors(a):
    """(s ``[..., r]``, V ``[..., n, r]``) of ``a`` ``[..., m, n]``, singular values in descending order."""
    _, s, vh = thin_svd(a)
    return s, _t(vh)


@singular_values_and_right_vectors.defjvp
def _svd_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    u, s, vh = thin_svd(a)
    v = _t(vh)
    dp = _mm(_mm(_t(u), da), v)
    ds = jnp.diagonal(dp, axis1=-2, axis2=-1)
    s_sq = s * s
    gap = s_sq[..., None, :] - s_sq[..., :, None]  # [i, j] = s_j² - s_i²
    off_diagonal = ~jnp.eye(s.shape[-1], dtype=bool)
    f = jnp.where(off_diagonal, 1.0 / jnp.where(off_diagonal, gap, 1.0), 0.0)
    dv = _mm(v, f * (s[..., :, None] * dp + _t(dp) * s[..., None, :]))
    m, n = a.shape[-2:]
    if n > m:  # V is not square: the part of dA^T U outside its columns
        da_t_u = _mm(_t(da), u)
        dv = dv + (da_t_u - _mm(v, _mm(vh, da_t_u))) / s[..., None, :]
    return (s, v), (ds, dv)

