/* The running read of a piece of a two-layer memory on a CPU, forward and backward: _RunningRead
 * in _running_read.py (same names), one batch row at a time, the rows split over torch's threads
 * (_native.h). Per row, with A[t] = Pa[1+t, 0], Da[t, j] = Pa[1+t, 1+j], c[t, j] = C[1+t, 1+j]
 * (C = Pa without momentum) read from the write's segment products in place:
 *
 *     P1 = A (q W1^T) + (c * q k^T) U1 + (Da * q k^T) hs + m (q M1^T)
 *     P2 = A (S W2^T) + (c * S Sk^T) U2 + m (S M2^T),        S = phi(P1)
 *     o  = P2 + r q
 *
 * Row-major and contiguous: q, k [L, D]; W1, M1 [h, D]; W2, M2 [O, h]; Sk, U1, hs [L, h]; U2
 * [L, O]; Pa, C [L+1, L+1]; m [L]; o [L, O]. The forward keeps per row what the backward reads
 * (the work buffer, laid out by work_offsets). _native.py builds this file twice, for REAL=float
 * and REAL=double. */
#include "_native.h"

/* configuration: dims, flags (the order _NativeRunningRead packs them in) */
enum { N_, L_, D_, H_, O_, MOM, DGD, L2NORM, RESID, ACT };

/* the work buffer per row: zW1 = q W1^T, zk = q k^T, zM1 = q M1^T, P1, S, g1 = act'(P1), inv_r,
 * zW2 = S W2^T, zs = S Sk^T, zM2 = S M2^T */
enum { W_ZW1, W_ZK, W_ZM1, W_P1, W_S, W_G1, W_INVR, W_ZW2, W_ZS, W_ZM2, W_COUNT };
static int64_t work_offsets(const int64_t *cfg, int64_t *off)
{
    const int64_t L = cfg[L_], h = cfg[H_], O = cfg[O_], mom = cfg[MOM];
    const int64_t sizes[W_COUNT] = {L * h, L * L, mom ? L * h : 0, L * h, L * h, L * h, L, L * O, L * L,
                                    mom ? L * O : 0};
    return block_offsets(sizes, W_COUNT, off);
}

int64_t work_size(const int64_t *cfg)
{
    int64_t off[W_COUNT];
    return work_offsets(cfg, off);
}

/* What both directions start with: the configuration as locals, the work buffer's layout, the
 * temporaries (a product's packing, six [L, max(L, h, O, D)] blocks and two [L]; out of memory:
 * return 1), the thread's rows [lo, hi) */
#define PROLOGUE(cfg)                                                                                  \
    const int64_t N = cfg[N_];                                                                         \
    const int L = cfg[L_], D = cfg[D_], h = cfg[H_], O = cfg[O_], mom = cfg[MOM], dgd = cfg[DGD];    \
    const int l2n = cfg[L2NORM], resid = cfg[RESID], act = cfg[ACT], ld = L + 1;                     \
    int64_t off[W_COUNT];                                                                              \
    const int64_t ws = work_offsets(cfg, off);                                                         \
    int64_t w = L > h ? L : h;                                                                         \
    w = w > O ? w : O;                                                                                 \
    w = w > D ? w : D;                                                                                 \
    real *const base = scratch_block(2 * w * w + 6 * L * w + 2 * L);                                   \
    if (!base) return 1;                                                                               \
    real *pack = base, *T0 = base + 2 * w * w, *T1 = T0 + L * w, *T2 = T1 + L * w, *T3 = T2 + L * w;  \
    real *T4 = T3 + L * w, *T5 = T4 + L * w, *T6 = T5 + L * w;                                        \
    int64_t lo, hi;                                                                                    \
    rows(N, &lo, &hi)

/* X[t, j] = coef[1+t, 1+j] z[t, j] (a coefficient matrix of the segment products times z) */
static void times_coef(const real *coef, int ld, const real *z, int L, real *X)
{
    for (int t = 0; t < L; t++)
        for (int j = 0; j < L; j++) X[t * L + j] = coef[(1 + t) * ld + 1 + j] * z[t * L + j];
}

/* One layer of the read: P = A (z W^T) + (c * z a^T) U + m (z M^T) (M NULL: no momentum), with
 * zW = z W^T, za = z a^T, zM = z M^T kept for the backward; X: a temporary [L, L] */
static void layer_forward(int L, int di, int dout, const real *z, const real *W, const real *M, const real *a,
                          const real *U, const real *Pa, const real *C, const real *m, int ld, real *zW, real *za,
                          real *zM, real *P, real *X, real *pack)
{
    gemm(L, dout, di, z, di, 1, W, 1, di, 0, zW, pack);
    gemm(L, L, di, z, di, 1, a, 1, di, 0, za, pack);
    for (int t = 0; t < L; t++)
        for (int j = 0; j < dout; j++) P[t * dout + j] = Pa[(1 + t) * ld] * zW[t * dout + j];
    times_coef(C, ld, za, L, X);
    gemm(L, dout, L, X, L, 1, U, dout, 1, 1, P, pack);
    if (M) {
        gemm(L, dout, di, z, di, 1, M, 1, di, 0, zM, pack);
        for (int t = 0; t < L; t++)
            for (int j = 0; j < dout; j++) P[t * dout + j] += m[t] * zM[t * dout + j];
    }
}

/* in: q W1 W2 M1 M2 k Sk U1 U2 hs Pa C m mask (M1, M2, C, m: NULL without momentum; hs: NULL
 * without DGD; mask: the residual's, per row, or NULL); out: o, work */
static int forward_rows(const int64_t *cfg, real *const *in, real *const *out, double eps2)
{
    PROLOGUE(cfg);
    for (int64_t r = lo; r < hi; r++) {
        const real *q = in[0] + r * L * D, *W1 = in[1] + r * h * D, *W2 = in[2] + r * O * h;
        const real *M1 = mom ? in[3] + r * h * D : 0, *M2 = mom ? in[4] + r * O * h : 0;
        const real *k = in[5] + r * L * D, *Sk = in[6] + r * L * h, *U1 = in[7] + r * L * h;
        const real *U2 = in[8] + r * L * O, *hs = dgd ? in[9] + r * L * h : 0, *Pa = in[10] + r * ld * ld;
        const real *C = mom ? in[11] + r * ld * ld : Pa, *m = mom ? in[12] + r * L : 0;
        const real rr = resid == 2 ? in[13][r] : resid;
        real *o = out[0] + r * L * O, *wk = out[1] + r * ws;
        real *zW1 = wk + off[W_ZW1], *zk = wk + off[W_ZK], *zM1 = wk + off[W_ZM1], *P1 = wk + off[W_P1];
        real *S = wk + off[W_S], *g1 = wk + off[W_G1], *inv_r = wk + off[W_INVR], *zW2 = wk + off[W_ZW2];
        real *zs = wk + off[W_ZS], *zM2 = wk + off[W_ZM2], *X = T0;

        /* P1 = A zW1 + (c * zk) U1 + (Da * zk) hs + m zM1 */
        layer_forward(L, D, h, q, W1, M1, k, U1, Pa, C, m, ld, zW1, zk, zM1, P1, X, pack);
        if (dgd) {
            times_coef(Pa, ld, zk, L, X);
            gemm(L, h, L, X, L, 1, hs, h, 1, 1, P1, pack);
        }
        /* S = act(P1) / sqrt(||act(P1)||^2 + eps2) (or act(P1)) */
        activate(act, P1, L * h, S, g1, 0);
        if (l2n)
            for (int t = 0; t < L; t++) {
                inv_r[t] = 1 / sqrt(dot(S + t * h, S + t * h, h) + eps2);
                for (int j = 0; j < h; j++) S[t * h + j] *= inv_r[t];
            }
        /* o = A zW2 + (c * zs) U2 + m zM2 + r q */
        layer_forward(L, h, O, S, W2, M2, Sk, U2, Pa, C, m, ld, zW2, zs, zM2, o, X, pack);
        if (rr != 0)  /* a residual needs O == D */
            for (int j = 0; j < L * O; j++) o[j] += rr * q[j];
    }
    return 0;
}

/* One layer's backward for g = dL/dP (the reverse of a layer above): dz = (g A) W + (ds * c) a
 * + (g m) M, dW = (g A)^T z, dM = (g m)^T z, dU = (c * za)^T g, da = (ds * c)^T z and the
 * coefficient gradients dA[t] += <g_t, zW_t>, dc += ds * za, dm[t] += <g_t, zM_t>, ds = g U^T
 * (M NULL: no momentum). gA, gm, ds, dza: temporaries [L, width], [L, width], [L, L], [L, L]. */
static void layer_backward(int L, int di, int dout, const real *g, const real *z, const real *W, const real *M,
                           const real *a, const real *U, const real *Pa, const real *C, const real *m, int ld,
                           const real *zW, const real *za, const real *zM, real *dz, real *dW, real *dM,
                           real *da, real *dU, real *dA, real *dc, real *dm, real *gA, real *gm, real *ds, real *dza,
                           real *pack)
{
    for (int t = 0; t < L; t++) {
        const real At = Pa[(1 + t) * ld];
        for (int j = 0; j < dout; j++) gA[t * dout + j] = At * g[t * dout + j];
        dA[t] += dot(g + t * dout, zW + t * dout, dout);
    }
    gemm(L, di, dout, gA, dout, 1, W, di, 1, 0, dz, pack);
    gemm(dout, di, L, gA, 1, dout, z, di, 1, 0, dW, pack);
    /* the write terms: ds = g U^T, dc += ds * za, dU = (c * za)^T g, dza = ds * c */
    gemm(L, L, dout, g, dout, 1, U, 1, dout, 0, ds, pack);
    for (int t = 0; t < L; t++)
        for (int j = 0; j < L; j++) {
            const real ct = C[(1 + t) * ld + 1 + j];
            dc[t * L + j] += ds[t * L + j] * za[t * L + j];
            dza[t * L + j] = ds[t * L + j] * ct;
        }
    times_coef(C, ld, za, L, gm);  /* (c * za), in gm's room for now */
    gemm(L, dout, L, gm, 1, L, g, dout, 1, 0, dU, pack);
    gemm(L, di, L, dza, L, 1, a, di, 1, 1, dz, pack);
    gemm(L, di, L, dza, 1, L, z, di, 1, 0, da, pack);
    if (M) {
        for (int t = 0; t < L; t++) {
            for (int j = 0; j < dout; j++) gm[t * dout + j] = m[t] * g[t * dout + j];
            dm[t] += dot(g + t * dout, zM + t * dout, dout);
        }
        gemm(L, di, dout, gm, dout, 1, M, di, 1, 1, dz, pack);
        gemm(dout, di, L, gm, 1, dout, z, di, 1, 0, dM, pack);
    }
}

/* in: the forward's, then its work; grad: do; out: dq dW1 dW2 dM1 dM2 dk dSk dU1 dU2 dhs dPa dC dm
 * (dPa, dC: [L+1, L+1] with the gradients of the entries the read takes, 0 elsewhere; without
 * momentum c's gradient goes to dPa) */
static int backward_rows(const int64_t *cfg, real *const *in, const real *grad, real *const *out)
{
    PROLOGUE(cfg);
    for (int64_t r = lo; r < hi; r++) {
        const real *q = in[0] + r * L * D, *W1 = in[1] + r * h * D, *W2 = in[2] + r * O * h;
        const real *M1 = mom ? in[3] + r * h * D : 0, *M2 = mom ? in[4] + r * O * h : 0;
        const real *k = in[5] + r * L * D, *Sk = in[6] + r * L * h, *U1 = in[7] + r * L * h;
        const real *U2 = in[8] + r * L * O, *hs = dgd ? in[9] + r * L * h : 0, *Pa = in[10] + r * ld * ld;
        const real *C = mom ? in[11] + r * ld * ld : Pa, *m = mom ? in[12] + r * L : 0;
        const real rr = resid == 2 ? in[13][r] : resid;
        const real *wk = in[14] + r * ws;
        const real *zW1 = wk + off[W_ZW1], *zk = wk + off[W_ZK], *zM1 = wk + off[W_ZM1];
        const real *S = wk + off[W_S], *g1 = wk + off[W_G1], *inv_r = wk + off[W_INVR];
        const real *zW2 = wk + off[W_ZW2], *zs = wk + off[W_ZS], *zM2 = wk + off[W_ZM2];
        const real *g = grad + r * L * O;
        real *dq = out[0] + r * L * D, *dW1 = out[1] + r * h * D, *dW2 = out[2] + r * O * h;
        real *dM1 = mom ? out[3] + r * h * D : 0, *dM2 = mom ? out[4] + r * O * h : 0;
        real *dk = out[5] + r * L * D, *dSk = out[6] + r * L * h, *dU1 = out[7] + r * L * h;
        real *dU2 = out[8] + r * L * O, *dhs = dgd ? out[9] + r * L * h : 0, *dPa = out[10] + r * ld * ld;
        real *dC = mom ? out[11] + r * ld * ld : dPa, *dm = mom ? out[12] + r * L : 0;
        real *dS = T0, *gA = T1, *gm = T2, *ds = T3, *dza = T4, *dc = T5, *dA = T6, *dmv = T6 + L;
        memset(dc, 0, sizeof(real) * L * L);
        memset(dA, 0, sizeof(real) * 2 * L);

        /* the second layer, then the hidden map (dP1 = J^T dS, into dS), then the first */
        layer_backward(L, h, O, g, S, W2, M2, Sk, U2, Pa, C, m, ld, zW2, zs, zM2, dS, dW2, dM2, dSk, dU2, dA,
                       dc, dmv, gA, gm, ds, dza, pack);
        if (l2n) project(dS, S, inv_r, L, h);
        for (int j = 0; j < L * h; j++) dS[j] *= g1[j];
        layer_backward(L, D, h, dS, q, W1, M1, k, U1, Pa, C, m, ld, zW1, zk, zM1, dq, dW1, dM1, dk, dU1, dA,
                       dc, dmv, gA, gm, ds, dza, pack);
        if (dgd) {  /* DGD's erase term (Da * zk) hs, as layer_backward's write term with U = hs */
            gemm(L, L, h, dS, h, 1, hs, 1, h, 0, ds, pack);
            times_coef(Pa, ld, zk, L, gm);
            gemm(L, h, L, gm, 1, L, dS, h, 1, 0, dhs, pack);
            times_coef(Pa, ld, ds, L, dza);
            gemm(L, D, L, dza, L, 1, k, D, 1, 1, dq, pack);
            gemm(L, D, L, dza, 1, L, q, D, 1, 1, dk, pack);
        }
        if (rr != 0)
            for (int j = 0; j < L * D; j++) dq[j] += rr * g[j];
        /* the coefficients' gradients, in the segment products' places */
        memset(dPa, 0, sizeof(real) * ld * ld);
        if (mom) memset(dC, 0, sizeof(real) * ld * ld);
        for (int t = 0; t < L; t++) {
            dPa[(1 + t) * ld] = dA[t];
            for (int j = 0; j < L; j++) {
                dC[(1 + t) * ld + 1 + j] += dc[t * L + j];
                if (dgd) dPa[(1 + t) * ld + 1 + j] += ds[t * L + j] * zk[t * L + j];
            }
            if (mom) dm[t] = dmv[t];
        }
    }
    return 0;
}

int forward(const int64_t *cfg, real *const *in, real *const *out, double eps2)
{
    IN_PARALLEL(forward_rows(cfg, in, out, eps2));
}

int backward(const int64_t *cfg, real *const *in, const real *grad, real *const *out)
{
    IN_PARALLEL(backward_rows(cfg, in, grad, out));
}
