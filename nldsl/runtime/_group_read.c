/* The anchor read of a stack of two-layer generating memories on a CPU, forward and backward:
 * _GroupRead in _group_read.py (same names), one batch row at a time (the rows split over torch's
 * threads, _native.h). Rows r of memory j = r / Ng (row i = r % Ng of its outputs); per row, on
 * the piece's L inputs x:
 *
 *     Y = S W2^T + r x,   S = phi(x W1^T) (the activation, L2-normalised or not)
 *     kind 0 (plain): Y;   kind 1 (unit): Y / max(||Y||, 1e-12)   (F.normalize)
 *     kind 2 (scalar): scale * sigmoid(Y[., 0] + shift + z)        (eta, alpha; z [L] or none)
 *
 * Row-major and contiguous: W1 [h, D], W2 [O, h], x [L, D] (O = D with a residual), S, g1 [L, h],
 * inv_r [L], Y [L, O], kept [L] (||Y|| of a unit row, the sigmoid of a scalar one). _native.py
 * builds this file twice, for REAL=float and REAL=double. */
#include "_native.h"

/* configuration: dims, flags (the order _NativeGroupRead packs them in) */
enum { N_, NG, G_, L_, D_, H_, O_, L2NORM, RESID, ACT };
enum { PLAIN, UNIT, SCALAR };
#define UNIT_EPS 1e-12

/* the temporaries: a product's packing (2 m^2, m the largest of L and the widths), dY, dS (the
 * forward's H) */
static real *temporaries(const int64_t *cfg, real **pack, real **dY, real **dS)
{
    int64_t m = cfg[H_] > cfg[D_] ? cfg[H_] : cfg[D_];
    m = m > cfg[O_] ? m : cfg[O_];
    m = m > cfg[L_] ? m : cfg[L_];
    real *base = scratch_block(2 * m * m + cfg[L_] * (cfg[O_] + cfg[H_]));
    if (base) *pack = base, *dY = base + 2 * m * m, *dS = *dY + cfg[L_] * cfg[O_];
    return base;
}

/* What both directions start with: the configuration as locals, the temporaries (out of memory:
 * return 1), the thread's rows (its share, or those of the sequence-heads [s0, s1): row_set in
 * _native.h); and per row r: its memory j, its row i among that memory's outputs, its inputs */
#define PROLOGUE(cfg, s0, s1)                                                                                 \
    const int64_t N = cfg[N_], Ng = cfg[NG];                                                                  \
    const int L = cfg[L_], D = cfg[D_], h = cfg[H_], O = cfg[O_], l2n = cfg[L2NORM], resid = cfg[RESID];    \
    real *pack, *dY, *dS;                                                                                     \
    if (!temporaries(cfg, &pack, &dY, &dS)) return 1;                                                         \
    int64_t count;                                                                                            \
    const RowSet rs = row_set(N, Ng, s0, s1, &count)
#define ROW(r)                                                                                                \
    const int64_t j = r / Ng, i = r % Ng;                                                                     \
    const real *W1 = in[0] + r * h * D, *W2 = in[1] + r * O * h, *x = in[2] + r * L * D;                     \
    const real rr = resid == 2 ? in[3][r] : resid

/* in: W1 W2 x mask; kinds [G]; params: shift, scale per memory; z: each scalar memory's addend
 * [Ng, L] or NULL; out: the memories' outputs ([Ng, L, O], scalar: [Ng, L]); keep: S inv_r (with
 * the L2 norm) g1 (act'(x W1^T)) Y kept */
static int forward_rows(const int64_t *cfg, const int64_t *kinds, const double *params, real *const *in,
                        real *const *z, real *const *out, real *const *keep, double eps2, int64_t s0, int64_t s1)
{
    PROLOGUE(cfg, s0, s1);
    for (int64_t q = 0; q < count; q++) {
        const int64_t r = row_at(&rs, q);
        ROW(r);
        real *S = keep[0] + r * L * h, *g1 = keep[2] + r * L * h, *H = dS;
        real *Y = keep[3] + r * L * O, *kept = keep[4] + r * L;
        /* S = act(H) / sqrt(||act(H)||^2 + eps2) (or act(H)), H = x W1^T */
        gemm(L, h, D, x, D, 1, W1, 1, D, 0, H, pack);
        activate(cfg[ACT], H, L * h, S, g1, 0);
        if (l2n) {
            real *inv_r = keep[1] + r * L;
            for (int t = 0; t < L; t++) {
                inv_r[t] = 1 / sqrt(dot(S + t * h, S + t * h, h) + eps2);
                for (int c = 0; c < h; c++) S[t * h + c] *= inv_r[t];
            }
        }
        gemm(L, O, h, S, h, 1, W2, 1, h, 0, Y, pack);
        if (rr != 0)
            for (int c = 0; c < L * O; c++) Y[c] += rr * x[c];
        if (kinds[j] == SCALAR) {
            const real shift = params[2 * j], scale = params[2 * j + 1];
            const real *zi = z[j] ? z[j] + i * L : 0;
            real *o = out[j] + i * L;
            for (int t = 0; t < L; t++) {
                const real p = Y[t * O] + shift + (zi ? zi[t] : 0), s = 1 / (1 + exp(-p));
                kept[t] = s;
                o[t] = scale * s;
            }
        } else {
            real *o = out[j] + i * L * O;
            for (int t = 0; t < L; t++) {
                real f = 1;
                kept[t] = 0;
                if (kinds[j] == UNIT) {
                    kept[t] = sqrt(dot(Y + t * O, Y + t * O, O));
                    f = 1 / (kept[t] > UNIT_EPS ? kept[t] : UNIT_EPS);
                }
                for (int c = 0; c < O; c++) o[t * O + c] = f * Y[t * O + c];
            }
        }
    }
    return 0;
}

/* in: W1 W2 x mask, then what the forward kept: S inv_r g1 Y kept; grad: each memory's output gradient (NULL:
 * zero); out: dW1 dW2 dx (acc: dW1 and dW2 hold gradients the weights' are added to); dz: each scalar
 * memory's gradient at its sigmoid's input [Ng, L] (NULL: not wanted) */
static int backward_rows(const int64_t *cfg, const int64_t *kinds, const double *params, real *const *in,
                         real *const *grad, real *const *out, real *const *dz, int acc, int64_t s0, int64_t s1)
{
    PROLOGUE(cfg, s0, s1);
    for (int64_t q = 0; q < count; q++) {
        const int64_t r = row_at(&rs, q);
        ROW(r);
        const real *S = in[4] + r * L * h, *inv_r = l2n ? in[5] + r * L : 0, *g1 = in[6] + r * L * h;
        const real *Y = in[7] + r * L * O, *kept = in[8] + r * L;
        real *dW1 = out[0] + r * h * D, *dW2 = out[1] + r * O * h, *dx = out[2] + r * L * D;
        memset(dY, 0, sizeof(real) * L * O);
        if (grad[j] && kinds[j] == SCALAR) {  /* o = scale sigmoid(p) */
            const real scale = params[2 * j + 1], *g = grad[j] + i * L;
            for (int t = 0; t < L; t++) {
                const real d = g[t] * scale * kept[t] * (1 - kept[t]);
                dY[t * O] = d;
                if (dz[j]) dz[j][i * L + t] = d;
            }
        } else if (grad[j]) {
            const real *g = grad[j] + i * L * O;
            for (int t = 0; t < L; t++) {
                const real *gt = g + t * O;
                if (kinds[j] == PLAIN) {
                    memcpy(dY + t * O, gt, sizeof(real) * O);
                    continue;
                }
                /* y = Y / n, n = max(||Y||, eps): dY = (g - y (y . g) [||Y|| >= eps]) / n */
                const real n = kept[t] > UNIT_EPS ? kept[t] : UNIT_EPS, f = 1 / n;
                const real yg = kept[t] >= UNIT_EPS ? f * dot(Y + t * O, gt, O) : 0;
                for (int c = 0; c < O; c++) dY[t * O + c] = (gt[c] - f * Y[t * O + c] * yg) * f;
            }
        } else if (kinds[j] == SCALAR && dz[j]) {
            memset(dz[j] + i * L, 0, sizeof(real) * L);
        }
        /* dH = J^T (dY W2), J the hidden map's Jacobian */
        gemm(L, h, O, dY, O, 1, W2, h, 1, 0, dS, pack);
        if (l2n) project(dS, S, inv_r, L, h);
        for (int c = 0; c < L * h; c++) dS[c] *= g1[c];
        gemm(h, D, L, dS, 1, h, x, D, 1, acc, dW1, pack);
        gemm(O, h, L, dY, 1, O, S, h, 1, acc, dW2, pack);
        if (rr != 0)  /* a residual needs O == D */
            for (int c = 0; c < L * D; c++) dx[c] = rr * dY[c];
        gemm(L, D, h, dS, h, 1, W1, D, 1, rr != 0, dx, pack);
    }
    return 0;
}

int forward(const int64_t *cfg, const int64_t *kinds, const double *params, real *const *in, real *const *z,
            real *const *out, real *const *keep, double eps2)
{
    IN_PARALLEL(forward_rows(cfg, kinds, params, in, z, out, keep, eps2, -1, -1));
}

/* the forward of the sequence-heads [s0, s1) on the calling thread alone (_mlp_write.c's
 * generation_forward runs a pass's pieces so) */
int forward_heads(const int64_t *cfg, const int64_t *kinds, const double *params, real *const *in, real *const *z,
                  real *const *out, real *const *keep, double eps2, int64_t s0, int64_t s1)
{
    return forward_rows(cfg, kinds, params, in, z, out, keep, eps2, s0, s1);
}

int backward(const int64_t *cfg, const int64_t *kinds, const double *params, real *const *in,
             real *const *grad, real *const *out, real *const *dz, int64_t acc)
{
    IN_PARALLEL(backward_rows(cfg, kinds, params, in, grad, out, dz, (int)acc, -1, -1));
}

/* the backward of the sequence-heads [s0, s1) on the calling thread alone (_mlp_write.c's
 * generation_backward) */
int backward_heads(const int64_t *cfg, const int64_t *kinds, const double *params, real *const *in,
                   real *const *grad, real *const *out, real *const *dz, int64_t acc, int64_t s0, int64_t s1)
{
    return backward_rows(cfg, kinds, params, in, grad, out, dz, (int)acc, s0, s1);
}
