/* The CMS's two-layer blocks (cms.py, _cms_block.py): a block's read, its backward, and a detached
 * chain's writes of one piece, one call each, over the BLAS gemm torch itself links (its address
 * set once by set_gemm). A block on a sequence's L tokens, weights W_in [H, D], W_out [D, H]
 * (nn.Linear layout), rms(x) = x / sqrt(mean(x^2) + 1e-6):
 *
 *     s = rms(x) (prenorm) or x;   h = s W_in^T;   a = act(h), d = act'(h);   y = a W_out^T (+ x)
 *
 * The products are a sequence's own (its weights may be its own, batch stride sW, or shared,
 * stride 0); the sequences split over torch's threads, each running its gemms single-threaded.
 * What the torch ops took ~40 calls a block and piece for (the norm, the activation, the
 * residual, the errors, the rank-L gradient sums) is one call here, on operands that stay in
 * cache between their steps. */
#include "_native.h"

typedef void (*Gemm)(const char *ta, const char *tb, const int *m, const int *n, const int *k, const real *alpha,
                     const real *A, const int *lda, const real *B, const int *ldb, const real *beta, real *C,
                     const int *ldc);
static Gemm blas;
/* the BLAS's per-thread thread count (MKL's MKL_Set_Num_Threads_Local: 0 = its global count), or NULL */
typedef int (*LocalThreads)(int);
static LocalThreads local_threads;

void set_gemm(void *fn, void *threads)
{
    blas = (Gemm)fn;
    local_threads = (LocalThreads)threads;
}

/* row-major C[m, n] = alpha op(A) op(B) + beta C (op: 'N' as stored, 'T' transposed; lda, ldb,
 * ldc: the row-major leading dimensions). Column-major BLAS sees the row-major C as C^T, so it is
 * asked for C^T = op(B)^T op(A)^T. */
static void mm(char ta, char tb, int m, int n, int k, real alpha, const real *A, int lda, const real *B, int ldb,
               real beta, real *C, int ldc)
{
    blas(&tb, &ta, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* C = A B for row-major A [m, k], B [k, n]: what _cms_block.py checks the gemm's calling
 * convention with before it trusts it */
void check_product(int64_t m, int64_t n, int64_t k, const real *A, const real *B, real *C)
{
    mm('N', 'N', m, n, k, 1, A, k, B, n, 0, C, n);
}

#define RMS_EPS 1e-6

/* s = x / rms(x) per row of x [L, D], r its 1 / rms */
static void rms_rows(const real *x, int L, int D, real *s, real *r)
{
    for (int t = 0; t < L; t++) {
        const real *xt = x + (int64_t)t * D;
        const real inv = 1 / sqrt(dot(xt, xt, D) / D + RMS_EPS);
        r[t] = inv;
        for (int j = 0; j < D; j++) s[(int64_t)t * D + j] = xt[j] * inv;
    }
}

/* g <- r (g - s mean(g s)) per row (the gradient at x from the one at s = rms(x)), then + add
 * (the residual's, or NULL) */
static void rms_backward_rows(real *g, const real *s, const real *r, const real *add, int L, int D)
{
    for (int t = 0; t < L; t++) {
        real *gt = g + (int64_t)t * D;
        const real *st = s + (int64_t)t * D, m = dot(gt, st, D) / D;
        for (int j = 0; j < D; j++) gt[j] = r[t] * (gt[j] - st[j] * m) + (add ? add[(int64_t)t * D + j] : 0);
    }
}

/* g <- the gradient at a block's input from the one at its (pre-normed) input s, in place: through
 * the pre-norm (prenorm), plus the output's gradient ``out`` through the residual (NULL: none) */
static void input_gradient(real *g, const real *s, const real *r, const real *out, int prenorm, int L, int D)
{
    if (prenorm) {
        rms_backward_rows(g, s, r, out, L, D);
    } else if (out) {
        for (int64_t i = 0; i < (int64_t)L * D; i++) g[i] += out[i];
    }
}

/* the threads of the calling parallel region (1 outside one, or without OpenMP) */
static inline int team(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* The threads' shares of B sequences: on torch's threads when there are several sequences (the
 * gemms then run single-threaded inside the parallel region: torch turns MKL's own check for
 * nesting off); one sequence runs here, its gemms threaded by the BLAS itself. */
#define FOR_SEQUENCES(B, ...)                                                                       \
    do {                                                                                             \
        const int64_t seqs_ = (B);                                                                   \
        _Pragma("omp parallel if (seqs_ > 1)")                                                       \
        {                                                                                            \
            int64_t lo_, hi_;                                                                        \
            rows(seqs_, &lo_, &hi_);                                                                 \
            const int one_ = local_threads && team() > 1;                                            \
            const int was_ = one_ ? local_threads(1) : 0;                                            \
            for (int64_t b = lo_; b < hi_; b++) __VA_ARGS__                                          \
            if (one_) local_threads(was_);                                                           \
        }                                                                                            \
    } while (0)

/* cfg: B, L, D, H, batch strides of W_in and W_out (0: shared), prenorm, residual, act.
 * in: x [B, L, D], W_in, W_out. out: y [B, L, D], s [B, L, D] and r [B, L] (NULL without the
 * pre-norm: s is x), a and d [B, L, H]. */
int block_forward(const int64_t *cfg, real *const *in, real *const *out)
{
    const int64_t B = cfg[0], sWi = cfg[4], sWo = cfg[5];
    const int L = cfg[1], D = cfg[2], H = cfg[3], prenorm = cfg[6], residual = cfg[7], act = cfg[8];
    const real *x = in[0], *Wi = in[1], *Wo = in[2];
    real *y = out[0], *s = out[1], *r = out[2], *a = out[3], *d = out[4];
    FOR_SEQUENCES(B, {
        const real *xb = x + b * L * D, *src = xb;
        real *ab = a + b * L * H, *yb = y + b * L * D;
        if (prenorm) {
            rms_rows(xb, L, D, s + b * L * D, r + b * L);
            src = s + b * L * D;
        }
        mm('N', 'T', L, H, D, 1, src, D, Wi + b * sWi, D, 0, ab, H);
        activate(act, ab, (int64_t)L * H, ab, d + b * L * H, NULL);
        if (residual) memcpy(yb, xb, sizeof(real) * L * D);
        mm('N', 'T', L, D, H, 1, ab, H, Wo + b * sWo, H, residual ? 1 : 0, yb, D);
    });
    return 0;
}

/* The read's backward. cfg: B, L, D, H, sWi, sWo, prenorm, residual, then where the weight
 * gradients go: 0 none, 1 per sequence ([B, ...]), 2 shared (one [H, D] / [D, H] over every
 * sequence's tokens), for W_in then W_out. in: g [B, L, D] (the output's gradient), s, r, a, d
 * (the forward's), W_in, W_out. out: dx (NULL: not wanted), dW_in, dW_out, gh [B, L, H] (the
 * hidden layer's gradient, room for it). */
int block_backward(const int64_t *cfg, real *const *in, real *const *out)
{
    const int64_t B = cfg[0], sWi = cfg[4], sWo = cfg[5], win = cfg[8], wout = cfg[9];
    const int L = cfg[1], D = cfg[2], H = cfg[3], prenorm = cfg[6], residual = cfg[7];
    const real *g = in[0], *s = in[1], *r = in[2], *a = in[3], *d = in[4], *Wi = in[5], *Wo = in[6];
    real *dx = out[0], *dWi = out[1], *dWo = out[2], *gh = out[3];
    FOR_SEQUENCES(B, {
        const real *gb = g + b * L * D, *sb = s + b * L * D;
        real *ghb = gh + b * L * H;
        mm('N', 'N', L, H, D, 1, gb, D, Wo + b * sWo, H, 0, ghb, H);
        const real *db = d + b * L * H;
        for (int64_t i = 0; i < (int64_t)L * H; i++) ghb[i] *= db[i];
        if (dx) {
            real *dxb = dx + b * L * D;
            mm('N', 'N', L, D, H, 1, ghb, H, Wi + b * sWi, D, 0, dxb, D);
            input_gradient(dxb, sb, r + b * L, residual ? gb : NULL, prenorm, L, D);
        }
        if (wout == 1) mm('T', 'N', D, H, L, 1, gb, D, a + b * L * H, H, 0, dWo + b * D * H, H);
        if (win == 1) mm('T', 'N', H, D, L, 1, ghb, H, sb, D, 0, dWi + b * H * D, D);
    });
    const int N = B * L;
    if (wout == 2) mm('T', 'N', D, H, N, 1, g, D, a, H, 0, dWo, H);
    if (win == 2) mm('T', 'N', H, D, N, 1, gh, H, s, D, 0, dWi, D);
    return 0;
}

/* A detached sequential chain's writes of one piece, from the surprise delta [B, L, D] at its
 * output, backwards through the blocks at the weights they were read with: per block l (last
 * first) its output error e, the hidden layer's e_h = (e W_out) * d, its gradient sums
 *     T_out = F_out + c_out e^T a,   T_in = F_in + c_in e_h^T s
 * and (l > 0) the error at its input, the block before's output error: e_h W_in through the
 * pre-norm, plus e through the residual. F (from): NULL (zero), T itself (a sum accumulated in
 * place), or another tensor (a sum to continue, or the weights to step from, c = -eta), copied
 * into T in cache right before its gemm adds to it. cfg: n, B, L, D, prenorm, residual, then per
 * block H, sWi, sWo and the batch strides of F_in, F_out (0: shared). c: per block c_in, c_out.
 * in: delta, then per block s, r, a, d, W_in, W_out, F_in, F_out. out: per block T_in [B, H, D],
 * T_out [B, D, H]. */
int chain_learn(const int64_t *cfg, const double *c, real *const *in, real *const *out)
{
    const int64_t n = cfg[0], B = cfg[1];
    const int L = cfg[2], D = cfg[3], prenorm = cfg[4], residual = cfg[5];
    const int64_t *block = cfg + 6;
    int64_t Hmax = 0;
    for (int64_t l = 0; l < n; l++) Hmax = block[5 * l] > Hmax ? block[5 * l] : Hmax;
    int status = 0;
    FOR_SEQUENCES(B, {
        real *work = scratch_block((int64_t)L * Hmax + 2 * (int64_t)L * D);
        if (!work) {
            __atomic_store_n(&status, 1, __ATOMIC_RELAXED);
            break;
        }
        real *gh = work, *e = work + L * Hmax, *ein = e + L * D;
        memcpy(e, in[0] + b * L * D, sizeof(real) * L * D);
        for (int64_t l = n - 1; l >= 0; l--) {
            const int64_t *k = block + 5 * l;
            const int H = k[0];
            real *const *bin = in + 1 + 8 * l;
            const real *sb = bin[0] + b * L * D, *ab = bin[2] + b * L * H, *db = bin[3] + b * L * H;
            const real *Wi = bin[4] + b * k[1], *Wo = bin[5] + b * k[2];
            real *Ti = out[2 * l] + b * H * D, *To = out[2 * l + 1] + b * D * H;
            const real *Fi = bin[6] ? bin[6] + b * k[3] : NULL, *Fo = bin[7] ? bin[7] + b * k[4] : NULL;
            if (Fi && Fi != Ti) memcpy(Ti, Fi, sizeof(real) * H * D);
            if (Fo && Fo != To) memcpy(To, Fo, sizeof(real) * D * H);
            mm('N', 'N', L, H, D, 1, e, D, Wo, H, 0, gh, H);
            for (int64_t i = 0; i < (int64_t)L * H; i++) gh[i] *= db[i];
            mm('T', 'N', D, H, L, c[2 * l + 1], e, D, ab, H, Fo ? 1 : 0, To, H);
            mm('T', 'N', H, D, L, c[2 * l], gh, H, sb, D, Fi ? 1 : 0, Ti, D);
            if (l == 0) break;
            mm('N', 'N', L, D, H, 1, gh, H, Wi, D, 0, ein, D);
            input_gradient(ein, sb, bin[1] + b * L, residual ? e : NULL, prenorm, L, D);
            real *next = ein;  /* the block before's output error: the two buffers swap roles */
            ein = e;
            e = next;
        }
    });
    return status;
}
