/* What the native CPU kernels share (_mlp_write.c, _group_read.c, _running_read.c, _conv.c,
 * _cms_block.c): the real type (REAL, set by _native.py's build: float or double), the split of a
 * call's rows over threads, register-blocked matrix products in GCC vector extensions (no
 * intrinsics: they ask for no particular instruction set), dot products, the L2 norm's Jacobian,
 * a per-thread block for a call's temporaries, and the hidden layer's activations. */
#ifndef NLDSL_NATIVE_H
#define NLDSL_NATIVE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef REAL real;

/* A kernel's rows are independent: IN_PARALLEL(call) runs ``call`` (an int status, 0 = done) on
 * every thread of an OpenMP team and returns a failure's status (else 0); rows() gives the
 * calling thread its share of n rows. _native.py builds with OpenMP only where it links torch's
 * own runtime (libgomp), so the team is torch's intra-op pool, torch.get_num_threads() threads;
 * elsewhere the pragma is ignored and one thread takes every row. A row's arithmetic does not
 * depend on the thread that runs it: the results are the same for any thread count. */
#define IN_PARALLEL(call)                                                                           \
    do {                                                                                           \
        int status_ = 0;                                                                           \
        _Pragma("omp parallel")                                                                    \
        {                                                                                          \
            const int s_ = (call);                                                                 \
            if (s_) __atomic_store_n(&status_, s_, __ATOMIC_RELAXED);                              \
        }                                                                                          \
        return status_;                                                                            \
    } while (0)

static inline void rows(int64_t n, int64_t *lo, int64_t *hi)
{
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
#else
    const int64_t t = 0, k = 1;
#endif
    *lo = n * t / k;
    *hi = n * (t + 1) / k;
}

/* The rows a kernel call runs on this thread, as a count and the q-th of them: its share of all
 * n rows (rows()), or, given a range [s0, s1) of sequence-heads (s0 >= 0), those heads' rows of
 * every memory in a stack of n / heads memories (row m * heads + s: memory m, head s). A pass
 * over several pieces gives each thread the same heads in every piece, so a head's read and
 * write (which read each other's outputs) run on one thread without a barrier between them. */
typedef struct {
    int64_t lo, heads, s0, s1;
} RowSet;

static inline RowSet row_set(int64_t n, int64_t heads, int64_t s0, int64_t s1, int64_t *count)
{
    RowSet rs = {0, heads, s0, s1};
    if (s0 < 0) {
        int64_t hi;
        rows(n, &rs.lo, &hi);
        *count = hi - rs.lo;
    } else {
        *count = n / heads * (s1 - s0);
    }
    return rs;
}

static inline int64_t row_at(const RowSet *rs, int64_t q)
{
    if (rs->s0 < 0) return rs->lo + q;
    const int64_t w = rs->s1 - rs->s0;
    return q / w * rs->heads + rs->s0 + q % w;
}

/* The offsets of n consecutive blocks of the given sizes in one buffer (a kernel's per-row work
 * buffer), into off; returns their total size */
static inline int64_t block_offsets(const int64_t *sizes, int n, int64_t *off)
{
    int64_t at = 0;
    for (int i = 0; i < n; i++) {
        off[i] = at;
        at += sizes[i];
    }
    return at;
}

/* the threads a kernel called now would split its rows over (for the tests; each kernel file is
 * its own library, so each defines it once) */
int64_t threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

#define VBYTES 64
#define VL ((int)(VBYTES / sizeof(real)))

/* the calling thread's share [lo, hi) of n values in whole vectors but the last (an elementwise
 * kernel's split: each value on one thread, whatever the thread count) */
static inline void vector_rows(int64_t n, int64_t *lo, int64_t *hi)
{
    rows((n + VL - 1) / VL, lo, hi);
    *lo *= VL;
    *hi = *hi * VL < n ? *hi * VL : n;
}

typedef real vreal __attribute__((vector_size(VBYTES)));
typedef real vhalf __attribute__((vector_size(VBYTES / 2)));  /* for a product's last columns */

static inline vreal vload(const real *p) { vreal v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(real *p, vreal v) { memcpy(p, &v, sizeof v); }
static inline vhalf hload(const real *p) { vhalf v; memcpy(&v, p, sizeof v); return v; }
static inline void hstore(real *p, vhalf v) { memcpy(p, &v, sizeof v); }

#define INLINE static inline __attribute__((always_inline))

/* A block of a product: rows r < R (4 or 1) of C (+)= A B over NV vectors of T (LANES each) of
 * columns; the accumulators stay in registers (R and NV are constants once inlined). */
#define PRODUCT_BLOCK(NAME, T, LOAD, STORE, LANES, NV)                                            \
    INLINE void NAME(const int R, int k, const real *A, int ai, int ap, const real *B, int ldb,   \
                     int acc, real *C, int ldc)                                                   \
    {                                                                                            \
        T c[4][NV];                                                                              \
        for (int r = 0; r < R; r++)                                                              \
            for (int v = 0; v < NV; v++) c[r][v] = (T){0};                                       \
        for (int p = 0; p < k; p++) {                                                            \
            T b[NV];                                                                             \
            for (int v = 0; v < NV; v++) b[v] = LOAD(B + p * ldb + v * (LANES));                 \
            for (int r = 0; r < R; r++) {                                                        \
                const real x = A[r * ai + p * ap];                                               \
                for (int v = 0; v < NV; v++) c[r][v] += x * b[v];                                \
            }                                                                                    \
        }                                                                                        \
        for (int r = 0; r < R; r++)                                                              \
            for (int v = 0; v < NV; v++) {                                                       \
                real *o = C + r * ldc + v * (LANES);                                             \
                STORE(o, acc ? c[r][v] + LOAD(o) : c[r][v]);                                     \
            }                                                                                    \
    }
PRODUCT_BLOCK(block2, vreal, vload, vstore, VL, 2)
PRODUCT_BLOCK(block1, vreal, vload, vstore, VL, 1)
PRODUCT_BLOCK(block_half, vhalf, hload, hstore, VL / 2, 1)

/* R rows (4 or 1) of C[., n] (+)= A B, B contiguous with rows ldb apart: the columns in blocks of
 * two vectors, one vector, half a vector, then one at a time */
INLINE void product_rows(const int R, int n, int k, const real *A, int ai, int ap, const real *B, int ldb,
                         int acc, real *C, int ldc)
{
    int j = 0;
    for (; j + 2 * VL <= n; j += 2 * VL) block2(R, k, A, ai, ap, B + j, ldb, acc, C + j, ldc);
    if (j + VL <= n) block1(R, k, A, ai, ap, B + j, ldb, acc, C + j, ldc), j += VL;
    if (j + VL / 2 <= n) block_half(R, k, A, ai, ap, B + j, ldb, acc, C + j, ldc), j += VL / 2;
    for (int r = 0; r < R; r++) {
        real *c = C + r * ldc;
        if (!acc)
            for (int jj = j; jj < n; jj++) c[jj] = 0;
        for (int p = 0; p < k; p++)
            for (int jj = j; jj < n; jj++) c[jj] += A[r * ai + p * ap] * B[p * ldb + jj];
    }
}

INLINE void product_shape(int m, int n, int k, const real *A, int ai, int ap, const real *B, int ldb, int acc,
                          real *C, int ldc)
{
    int i = 0;
    for (; i + 4 <= m; i += 4) product_rows(4, n, k, A + i * ai, ai, ap, B, ldb, acc, C + i * ldc, ldc);
    for (; i < m; i++) product_rows(1, n, k, A + i * ai, ai, ap, B, ldb, acc, C + i * ldc, ldc);
}

/* C[m, n] (+)= A B, B contiguous with rows ldb apart, C's rows ldc apart. The memories' products
 * are a head or a chunk wide: for widths and depths of 8 to 64 (powers of two) the loops are
 * compiled with them as constants (fixed trip counts, no column tails: a write of Hope's 32-wide
 * memories takes about 15% less). */
static void product(int m, int n, int k, const real *A, int ai, int ap, const real *B, int ldb, int acc,
                    real *C, int ldc)
{
#define PRODUCT_SHAPE(N, K)                                                                        \
    if (n == (N) && k == (K)) {                                                                    \
        product_shape(m, N, K, A, ai, ap, B, ldb, acc, C, ldc);                                    \
        return;                                                                                    \
    }
#define PRODUCT_DEPTHS(N)                                                                          \
    PRODUCT_SHAPE(N, 8) PRODUCT_SHAPE(N, 16) PRODUCT_SHAPE(N, 32) PRODUCT_SHAPE(N, 64)
    PRODUCT_DEPTHS(8) PRODUCT_DEPTHS(16) PRODUCT_DEPTHS(32) PRODUCT_DEPTHS(64)
#undef PRODUCT_DEPTHS
#undef PRODUCT_SHAPE
    product_shape(m, n, k, A, ai, ap, B, ldb, acc, C, ldc);
}

/* C[m, n] (+)= A B with A(i, p) = A[i * ai + p * ap], B(p, j) = B[p * bi + j * bj]; C row-major.
 * The inner loops run along rows of B and C in vectors, so a B whose rows are not contiguous (a
 * transposed operand) is copied first into ``pack`` (2 max(m, n, k)^2 values at most), or, where
 * copying A is cheaper, the product runs transposed, C^T = B^T A^T, and is copied into C. */
static void gemm(int m, int n, int k, const real *A, int ai, int ap, const real *B, int bi, int bj,
                 int acc, real *C, real *pack)
{
    if (bj == 1) {
        product(m, n, k, A, ai, ap, B, bi, acc, C, n);
    } else if (m * k + m * n < n * k) {
        real *At = pack, *Ct = pack + k * m;  /* A^T [k, m]; C^T [n, m] */
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++) At[p * m + i] = A[i * ai + p * ap];
        product(n, m, k, B, bj, bi, At, m, 0, Ct, m);
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++) C[i * n + j] = acc ? C[i * n + j] + Ct[j * m + i] : Ct[j * m + i];
    } else {
        for (int j = 0; j < n; j++)
            for (int p = 0; p < k; p++) pack[p * n + j] = B[p * bi + j * bj];
        product(m, n, k, A, ai, ap, pack, n, acc, C, n);
    }
}

/* x . y in vectors (two accumulators: a sum's chain of dependent adds is what bounds it) */
static inline real dot(const real *x, const real *y, int n)
{
    vreal s0 = {0}, s1 = {0};
    int j = 0;
    for (; j + 2 * VL <= n; j += 2 * VL) {
        s0 += vload(x + j) * vload(y + j);
        s1 += vload(x + j + VL) * vload(y + j + VL);
    }
    for (; j + VL <= n; j += VL) s0 += vload(x + j) * vload(y + j);
    s0 += s1;
    real s = 0;
    for (int i = 0; i < VL; i++) s += s0[i];
    for (; j < n; j++) s += x[j] * y[j];
    return s;
}

/* (d - n (n . d)) / r per row: the L2 norm's Jacobian applied to d (in place) */
static void project(real *d, const real *nrm, const real *inv_r, int rows, int w)
{
    for (int t = 0; t < rows; t++) {
        real *x = d + t * w;
        const real *u = nrm + t * w;
        real nd = dot(u, x, w);
        for (int j = 0; j < w; j++) x[j] = (x[j] - u[j] * nd) * inv_r[t];
    }
}

/* A per-thread block of at least ``values`` reals, kept and grown as needed (stack arrays of a
 * call's temporaries could overflow a thread's stack; a fresh block per call costs page faults);
 * NULL when out of memory. One block per kernel file (``static``). */
static real *scratch_block(int64_t values)
{
    static __thread real *block;
    static __thread int64_t size;
    if (values > size) {
        real *grown = realloc(block, values * sizeof(real));
        if (!grown) return 0;
        block = grown;
        size = values;
    }
    return block;
}

/* The hidden layer's activations and their first two derivatives, elementwise (the formulas of
 * _activations.py). float: written for the compiler's vectoriser (selects, no calls): exp by
 * range reduction and a polynomial, the normal CDF by the erfc approximation of Numerical Recipes
 * (relative error < 1.2e-7), as accurate as torch's float32 ops; double: libm (what the float64
 * tests compare with torch to 1e-10). */
enum { ACT_IDENTITY, ACT_GELU, ACT_SILU, ACT_RELU, ACT_TANH };

#define INV_SQRT_2PI 0.398942280401432678
#define SQRT1_2 0.707106781186547524

/* e^x for x in [-87, 88] (clamped): x = n ln 2 + r, |r| <= ln 2 / 2, e^r by Taylor to r^7, 2^n
 * in the exponent bits */
static inline float exp_float(float x)
{
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float magic = 12582912.0f;  /* 1.5 2^23: adding it rounds to an integer in the low bits */
    const float t = x * 1.44269504088896341f + magic, n = t - magic;
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Phi(x) = erfc(-x / sqrt 2) / 2 */
static inline float cdf_float(float x)
{
    const float z = (x < 0 ? -x : x) * (float)SQRT1_2, t = 1 / (1 + 0.5f * z);
    float p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    const float e = t * exp_float(p - z * z);  /* erfc(z) */
    return x < 0 ? 0.5f * e : 1 - 0.5f * e;
}

/* tanh: by e^{-2|x|} above 0.3, by its Taylor series (to x^11) below, where 1 - e^{-2|x|} cancels */
static inline float tanh_float(float x)
{
    const float a = x < 0 ? -x : x, e = exp_float(-2 * a), big = (1 - e) / (1 + e);
    const float x2 = x * x;
    float p = -1382.0f / 155925;
    p = p * x2 + 62.0f / 2835;
    p = p * x2 - 17.0f / 315;
    p = p * x2 + 2.0f / 15;
    p = p * x2 - 1.0f / 3;
    const float small = a + a * x2 * p;
    const float y = a < 0.3f ? small : big;
    return x < 0 ? -y : y;
}

/* float: the above; double: libm (the float code is dead there, and removed) */
#define FLOAT_REAL (sizeof(real) == sizeof(float))
static inline real exp_real(real x) { return FLOAT_REAL ? exp_float(x) : exp(x); }
static inline real cdf_real(real x) { return FLOAT_REAL ? cdf_float(x) : 0.5 * erfc(-x * SQRT1_2); }
static inline real tanh_real(real x) { return FLOAT_REAL ? tanh_float(x) : tanh(x); }

/* a = act(h), d1 = act'(h), d2 = act''(h) over n values (d1, d2: NULL = not wanted) */
static void activate(int act, const real *h, int64_t n, real *a, real *d1, real *d2)
{
    switch (act) {
    case ACT_GELU:  /* x Phi(x); Phi + x phi; phi (2 - x^2) */
        for (int64_t i = 0; i < n; i++) {
            const real x = h[i], c = cdf_real(x), f = (real)INV_SQRT_2PI * exp_real(-(real)0.5 * x * x);
            if (a) a[i] = x * c;
            if (d1) d1[i] = c + x * f;
            if (d2) d2[i] = f * (2 - x * x);
        }
        break;
    case ACT_SILU:  /* x s; s (1 + x (1 - s)); s (1 - s) (2 + x (1 - 2 s)) */
        for (int64_t i = 0; i < n; i++) {
            const real x = h[i], s = 1 / (1 + exp_real(-x));
            if (a) a[i] = x * s;
            if (d1) d1[i] = s * (1 + x * (1 - s));
            if (d2) d2[i] = s * (1 - s) * (2 + x * (1 - 2 * s));
        }
        break;
    case ACT_TANH:  /* t; 1 - t^2; -2 t (1 - t^2) */
        for (int64_t i = 0; i < n; i++) {
            const real t = tanh_real(h[i]);
            if (a) a[i] = t;
            if (d1) d1[i] = 1 - t * t;
            if (d2) d2[i] = -2 * t * (1 - t * t);
        }
        break;
    case ACT_RELU:
        for (int64_t i = 0; i < n; i++) {
            if (a) a[i] = h[i] > 0 ? h[i] : 0;
            if (d1) d1[i] = h[i] > 0;
            if (d2) d2[i] = 0;
        }
        break;
    default:  /* identity */
        for (int64_t i = 0; i < n; i++) {
            if (a) a[i] = h[i];
            if (d1) d1[i] = 1;
            if (d2) d2[i] = 0;
        }
    }
}

#endif
