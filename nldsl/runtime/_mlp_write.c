/* The write of one piece to a two-layer MLP memory on a CPU, forward and backward: the lines of
 * _MlpWrite in _mlp_write.py (same names, same order), run one batch row at a time. As torch ops
 * every line is a call over all rows, and a piece's ~200 calls each stream their operands through
 * memory; here a row's operands (a few KB) stay in the core's L1 from the first line to the last.
 * The hidden layer (its product, activation and L2 norm) and the gate coefficients (_Gates)
 * included. The rows are split over torch's threads (_native.h). _native.py builds this file
 * twice, for REAL=float and REAL=double.
 *
 * Per row, row-major and contiguous: W1, Wa1, M1 [h, D]; W2, Wa2, M2 [O, h]; k [L, D]; v [L, Dv];
 * Z = [k; v] (Lz = 2L rows, signal "self") or k (Lz = L); H, S, g1 [Lz, h]; inv_r [Lz]; eta,
 * alpha, beta [L]. */
#include "_native.h"

/* configuration: dims, flags (the order _NativeMlpWrite packs them in) */
enum { N_, L_, LZ, D_, H_, O_, DV, SELF, L2OBJ, DGD, MOM, SAME, L2NORM, RESID, READ, ACT, NK };

/* The gate coefficients of a piece: _Gates in _mlp_write.py, per row. From the gates a = alpha
 * (retention; NULL: 1) and b = beta (momentum; NULL: none) of the piece's L tokens, the segment
 * products Pa, Pb [L+1, L+1] (row and column 0: the piece's start), C = Pa Pb (with momentum,
 * else Pa) and m[t] = sum_j Pa[1+t, 1+j] Pb[1+j, 0]; the coefficients are views of them (the
 * names of Coefficients; p0, Pp and Cp by rows ld = L + 1 apart) but mp, m shifted by one. */
typedef struct {
    const real *Pa, *Pb, *C, *cl, *bl, *dl, *Cp;
    real *mp, A, mL, bL;
} Gates;

/* P[t, j] = prod_{l=j+1}^{t} a_l for j <= t, 0 above (segment_products in _common.py, its
 * cumulative product's order of multiplications); a NULL: gates of 1 */
static void segment_products(const real *a, int L, real *P)
{
    const int ld = L + 1;
    for (int t = 0; t <= L; t++)
        for (int j = 0; j <= L; j++)
            P[t * ld + j] = j > t ? 0 : j == t ? 1 : P[(t - 1) * ld + j] * (a ? a[t - 1] : 1);
}

/* a row's gates into Pa, Pb, C ([L+1]^2; Pb, C: with momentum only) and m, mp ([L]) */
static Gates gates(const real *alpha, const real *beta, int L, real *Pa, real *Pb, real *C, real *m, real *mp)
{
    const int ld = L + 1;
    Gates g = {.Pa = Pa, .C = Pa, .mp = mp};
    segment_products(alpha, L, Pa);
    if (beta) {
        segment_products(beta, L, Pb);
        for (int t = 0; t <= L; t++)  /* C = Pa Pb, both lower triangular */
            for (int j = 0; j <= L; j++) {
                real s = 0;
                for (int l = j; l <= t; l++) s += Pa[t * ld + l] * Pb[l * ld + j];
                C[t * ld + j] = s;
            }
        for (int t = 0; t < L; t++) {
            real s = 0;
            for (int j = 0; j < L; j++) s += Pa[(1 + t) * ld + 1 + j] * Pb[(1 + j) * ld];
            m[t] = s;
            mp[t] = t ? m[t - 1] : 0;
        }
        g.Pb = Pb, g.C = C;
        g.mL = m[L - 1], g.bL = Pb[L * ld], g.bl = Pb + L * ld + 1;
    }
    g.A = Pa[L * ld], g.cl = g.C + L * ld + 1, g.dl = Pa + L * ld + 1, g.Cp = g.C + 1;
    return g;
}

/* d/da_l of sum_{t,j} dP[t, j] P[t, j] (P = segment_products(a)), l = 1..L, into da[l - 1]:
 * sum_j P[l-1, j] (P^T dP)[l, j] (_segment_products_backward in _mlp_write.py). The matrices are
 * a few tokens wide and triangular: plain loops over their nonzero parts (j < l <= t; dP's
 * entries on and above the diagonal drop out). */
static void segment_products_backward(const real *P, const real *dP, int L, real *da, real *X)
{
    const int ld = L + 1;
    memset(X, 0, sizeof(real) * ld * ld);  /* X = P^T dP at j < a (P[t, a] = 0 for t < a) */
    for (int t = 1; t <= L; t++)
        for (int a = 1; a <= t; a++) {
            const real p = P[t * ld + a];
            for (int j = 0; j < a; j++) X[a * ld + j] += p * dP[t * ld + j];
        }
    for (int l = 0; l < L; l++) da[l] = dot(P + l * ld, X + (l + 1) * ld, l + 1);
}

/* The coefficients' gradients (the names of Coefficients with a d; ddl, dp0, dPp, dCp with DGD,
 * dmL, dbL, dbl and dmp with momentum; dPp, dCp [L, L]), plus those of a running read's views
 * (gPa, gC [L+1]^2 and gm [L], or NULL), to the gates' (dalpha, dbeta: NULL where not wanted).
 * dPa, dPb, dC, dm, X: temporaries. */
typedef struct {
    real dA, dmL, dbL, *dcl, *dbl, *ddl, *dp0, *dPp, *dCp, *dmp;
} GatesGrad;

static void gates_backward(const Gates *g, const GatesGrad *d, const real *gPa, const real *gC, const real *gm,
                           int L, int dgd, real *dalpha, real *dbeta, real *dPa, real *dPb, real *dC, real *dm,
                           real *X)
{
    const int ld = L + 1, mom = g->Pb != 0;
    const size_t size = sizeof(real) * ld * ld;
    if (gPa) memcpy(dPa, gPa, size); else memset(dPa, 0, size);
    if (!mom) dC = dPa;
    else if (gC) memcpy(dC, gC, size); else memset(dC, 0, size);
    if (mom) memset(dPb, 0, size);
    dPa[L * ld] += d->dA;
    for (int j = 0; j < L; j++) dC[L * ld + 1 + j] += d->dcl[j];
    if (dgd)
        for (int t = 0; t < L; t++) {
            dPa[L * ld + 1 + t] += d->ddl[t];
            dPa[t * ld] += d->dp0[t];
            for (int j = 0; j < L; j++) {
                dPa[t * ld + 1 + j] += d->dPp[t * L + j];
                dC[t * ld + 1 + j] += d->dCp[t * L + j];
            }
        }
    if (mom) {
        /* m = Da Bv, C = Pa Pb */
        dPb[L * ld] += d->dbL;
        for (int t = 0; t < L; t++) {
            dPb[L * ld + 1 + t] += d->dbl[t];
            dm[t] = (gm ? gm[t] : 0) + (t == L - 1 ? d->dmL : 0) + (dgd && t < L - 1 ? d->dmp[t + 1] : 0);
        }
        for (int t = 0; t < L; t++)
            for (int j = 0; j < L; j++) {
                dPa[(1 + t) * ld + 1 + j] += dm[t] * g->Pb[(1 + j) * ld];
                dPb[(1 + j) * ld] += g->Pa[(1 + t) * ld + 1 + j] * dm[t];
            }
        /* dPa += dC Pb^T and dPb += Pa^T dC below the diagonal (the rest drops out), by rows;
         * Pb^T in X (Pb[j, l] = 0 for l > j, Pa[u, t] = 0 for u < t) */
        for (int i = 0; i < ld; i++)
            for (int l = 0; l < ld; l++) X[l * ld + i] = g->Pb[i * ld + l];
        for (int t = 1; t <= L; t++)
            for (int l = 0; l < t; l++) {
                const real c = dC[t * ld + l];
                for (int j = l; j < t; j++) dPa[t * ld + j] += c * X[l * ld + j];
            }
        for (int u = 1; u <= L; u++)
            for (int t = 1; t <= u; t++) {
                const real p = g->Pa[u * ld + t];
                for (int j = 0; j < t; j++) dPb[t * ld + j] += p * dC[u * ld + j];
            }
        if (dbeta) segment_products_backward(g->Pb, dPb, L, dbeta, X);
    }
    if (dalpha) segment_products_backward(g->Pa, dPa, L, dalpha, X);
}

/* what the forward keeps per row for the backward, in this order (Xk: only at a separate anchor;
 * at the piece's anchor it is H's first L rows) */
enum { W_EPS, W_D1, W_PD1, W_E1, W_KK, W_XK, W_R, W_TINV, W_KM1, W_LEFT1, W_LEFT2, W_COUNT };
static int64_t work_offsets(const int64_t *cfg, int64_t *off)
{
    const int64_t L = cfg[L_], h = cfg[H_], O = cfg[O_];
    const int64_t sizes[W_COUNT] = {L * O, L * h, L * h, L * h, L * L, cfg[SAME] ? 0 : L * h, L * h, L * L,
                                    L * h, L * h, L * O};
    return block_offsets(sizes, W_COUNT, off);
}

int64_t work_size(const int64_t *cfg)
{
    int64_t off[W_COUNT];
    return work_offsets(cfg, off);
}

/* A call's temporaries, carved from the thread's scratch block by TAKE: at most NTEMP of them,
 * each at most ``each`` = m^2 values, m the largest of Lz, L + 1 and the widths (temporaries are
 * [L or Lz, L or a width], [width, width] or [L + 1, L + 1]). */
#define NTEMP 56
#define TAKE(n) (at += (n), at - (n))
static real *scratch(const int64_t *cfg, int64_t *each)
{
    int64_t m = cfg[H_] > cfg[D_] ? cfg[H_] : cfg[D_];
    m = m > cfg[O_] ? m : cfg[O_];
    m = m > cfg[LZ] ? m : cfg[LZ];
    m = m > cfg[L_] + 1 ? m : cfg[L_] + 1;
    *each = m * m;
    return scratch_block(NTEMP * *each);
}

/* What both directions start with: the configuration as locals, the work buffer's layout, the
 * temporaries' block (out of memory: return 1) */
#define PROLOGUE(cfg)                                                                                      \
    const int N = cfg[N_], L = cfg[L_], Lz = cfg[LZ], D = cfg[D_], h = cfg[H_], O = cfg[O_], Dv = cfg[DV]; \
    const int64_t Nk = cfg[NK]; /* the rows of k, v, eta, alpha, beta: row r reads row r % Nk */          \
    const int self = cfg[SELF], l2obj = cfg[L2OBJ], dgd = cfg[DGD], mom = cfg[MOM], same = cfg[SAME];    \
    const int l2n = cfg[L2NORM], resid = cfg[RESID], read = cfg[READ], act = cfg[ACT], ld = L + 1;         \
    int64_t off[W_COUNT];                                                                                  \
    const int64_t ws = work_offsets(cfg, off);                                                             \
    int64_t each;                                                                                          \
    real *const base = scratch(cfg, &each), *at = base;                                                    \
    if (!base) return 1

/* in: W1 W2 M1 M2 Wa1 Wa2 k v eta mask alpha beta (mask: the residual's, per row; alpha [L],
 * NULL: no retention; beta [L] with momentum); out: W1n W2n M1n M2n U1 U2 hs work, the hidden
 * layer H S g1 inv_r (S = act(H), L2-normalised by 1 / inv_r; g1 = act'(H)), then for a running
 * read the gates it reads: Pa and, with momentum, C [L+1, L+1] and m [L]. The rows: this thread's
 * share (s0 < 0), or those of the sequence-heads [s0, s1) (row_set, _native.h) */
static int forward_rows(const int64_t *cfg, real *const *in, real *const *out, double eps2, int64_t s0,
                        int64_t s1)
{
    PROLOGUE(cfg);
    real *Y = TAKE(Lz * O), *CK = TAKE(L * L), *nR = TAKE(L * h), *bU = TAKE(each), *pack = TAKE(2 * each);
    real *Pa = TAKE(ld * ld), *Pb = TAKE(ld * ld), *C = TAKE(ld * ld), *m = TAKE(L), *mp = TAKE(L);
    if (at - base > NTEMP * each) return 2;  /* more temporaries than the block holds: a bug */
    int64_t count;
    const RowSet rs = row_set(N, Nk, s0, s1, &count);
    for (int64_t q = 0; q < count; q++) {
        const int64_t r = row_at(&rs, q);  /* 64-bit: the offsets r * rows * cols */
        const real *W1 = in[0] + r * h * D, *W2 = in[1] + r * O * h;
        const real *M1 = mom ? in[2] + r * h * D : 0, *M2 = mom ? in[3] + r * O * h : 0;
        const real *Wa1 = same ? W1 : in[4] + r * h * D, *Wa2 = same ? W2 : in[5] + r * O * h;
        const int64_t rk = r % Nk;
        const real *k = in[6] + rk * L * D, *v = in[7] + rk * L * Dv, *eta = in[8] + rk * L;
        const real rr = resid == 2 ? in[9][r] : resid;
        real *H = out[8] + r * Lz * h, *S = out[9] + r * Lz * h, *g1 = out[10] + r * Lz * h;
        real *inv_r = l2n ? out[11] + r * Lz : 0;
        /* H = Z W_a1^T (k's rows, then v's); S = act(H) / r, r = sqrt(||act(H)||^2 + eps2) */
        gemm(L, h, D, k, D, 1, Wa1, 1, D, 0, H, pack);
        if (self) gemm(L, h, D, v, Dv, 1, Wa1, 1, D, 0, H + L * h, pack);
        activate(act, H, Lz * h, S, g1, 0);
        if (l2n)
            for (int t = 0; t < Lz; t++) {
                inv_r[t] = 1 / sqrt(dot(S + t * h, S + t * h, h) + eps2);
                for (int j = 0; j < h; j++) S[t * h + j] *= inv_r[t];
            }
        real *W1n = out[0] + r * h * D, *W2n = out[1] + r * O * h;
        real *M1n = mom ? out[2] + r * h * D : 0, *M2n = mom ? out[3] + r * O * h : 0;
        real *U1 = out[4] + r * L * h, *U2 = out[5] + r * L * O, *hs = dgd ? out[6] + r * L * h : 0;
        real *w = out[7] + r * ws;
        real *eps = w + off[W_EPS], *d1 = w + off[W_D1], *pd1 = w + off[W_PD1], *e1 = w + off[W_E1];
        real *KK = w + off[W_KK], *R = w + off[W_R], *Tinv = w + off[W_TINV];
        real *kM1 = w + off[W_KM1], *left1 = w + off[W_LEFT1], *left2 = w + off[W_LEFT2];
        const real *Xk = same ? H : w + off[W_XK];  /* k W_1^T */
        const Gates g = gates(in[10] ? in[10] + rk * L : 0, mom ? in[11] + rk * L : 0, L,
                              read ? out[12] + r * ld * ld : Pa, Pb, read && mom ? out[13] + r * ld * ld : C,
                              read && mom ? out[14] + r * L : m, mp);

        /* Y = S W_a2^T + r Z; eps = y - target (l2) or -target (dot) */
        gemm(Lz, O, h, S, h, 1, Wa2, 1, h, 0, Y, pack);
        if (rr != 0)
            for (int t = 0; t < Lz; t++)
                for (int j = 0; j < O; j++) Y[t * O + j] += rr * (t < L ? k[t * D + j] : v[(t - L) * Dv + j]);
        for (int t = 0; t < L; t++)
            for (int j = 0; j < O; j++) {
                real target = self ? Y[(L + t) * O + j] : v[t * Dv + j];
                eps[t * O + j] = l2obj ? Y[t * O + j] - target : -target;
            }
        /* d1 = eps W_a2; e1 = J^T d1 */
        gemm(L, h, O, eps, O, 1, Wa2, h, 1, 0, d1, pack);
        memcpy(pd1, d1, sizeof(real) * L * h);
        if (l2n) project(pd1, S, inv_r, L, h);
        for (int t = 0; t < L; t++)
            for (int j = 0; j < h; j++) {
                e1[t * h + j] = g1[t * h + j] * pd1[t * h + j];
                U1[t * h + j] = -eta[t] * e1[t * h + j];
                left1[t * h + j] = g.cl[t] * U1[t * h + j];
            }
        for (int t = 0; t < L; t++)
            for (int j = 0; j < O; j++) {
                U2[t * O + j] = -eta[t] * eps[t * O + j];
                left2[t * O + j] = g.cl[t] * U2[t * O + j];
            }
        if (dgd) {
            gemm(L, L, D, k, D, 1, k, 1, D, 0, KK, pack);
            if (!same) gemm(L, h, D, k, D, 1, W1, 1, D, 0, w + off[W_XK], pack);
            /* R = p0 Xk + (Cp * KK) U1 + mp k M1^T */
            for (int t = 0; t < L; t++)
                for (int j = 0; j < L; j++) CK[t * L + j] = g.Cp[t * ld + j] * KK[t * L + j];
            gemm(L, h, L, CK, L, 1, U1, h, 1, 0, R, pack);
            for (int t = 0; t < L; t++)
                for (int j = 0; j < h; j++) R[t * h + j] += g.Pa[t * ld] * Xk[t * h + j];
            if (mom) {
                gemm(L, h, D, k, D, 1, M1, 1, D, 0, kM1, pack);
                for (int t = 0; t < L; t++)
                    for (int j = 0; j < h; j++) R[t * h + j] += g.mp[t] * kM1[t * h + j];
            }
            /* Tinv = (I + strict_lower(eta Pp * KK))^-1, by forward substitution */
            for (int i = 0; i < L; i++) {
                for (int j = 0; j < L; j++) Tinv[i * L + j] = i == j;
                for (int j = 0; j < i; j++) {
                    real s = 0;
                    for (int l = j; l < i; l++) s += eta[i] * g.Pa[i * ld + 1 + l] * KK[i * L + l] * Tinv[l * L + j];
                    Tinv[i * L + j] = -s;
                }
            }
            /* hs = Tinv (-eta R) */
            for (int t = 0; t < L; t++)
                for (int j = 0; j < h; j++) nR[t * h + j] = -eta[t] * R[t * h + j];
            gemm(L, h, L, Tinv, L, 1, nR, h, 1, 0, hs, pack);
            for (int t = 0; t < L; t++)
                for (int j = 0; j < h; j++) left1[t * h + j] += g.dl[t] * hs[t * h + j];
        }
        /* the end state: A W + mL M + left^T a (a = k for W1, S_k for W2), the momenta likewise */
        const real A = g.A, mL = mom ? g.mL : 0;
        gemm(h, D, L, left1, 1, h, k, D, 1, 0, W1n, pack);
        gemm(O, h, L, left2, 1, O, S, h, 1, 0, W2n, pack);
        for (int j = 0; j < h * D; j++) W1n[j] += A * W1[j] + (mom ? mL * M1[j] : 0);
        for (int j = 0; j < O * h; j++) W2n[j] += A * W2[j] + (mom ? mL * M2[j] : 0);
        if (mom) {
            const real bL = g.bL;
            for (int t = 0; t < L; t++)
                for (int j = 0; j < h; j++) bU[t * h + j] = g.bl[t] * U1[t * h + j];
            gemm(h, D, L, bU, 1, h, k, D, 1, 0, M1n, pack);
            for (int t = 0; t < L; t++)
                for (int j = 0; j < O; j++) bU[t * O + j] = g.bl[t] * U2[t * O + j];
            gemm(O, h, L, bU, 1, O, S, h, 1, 0, M2n, pack);
            for (int j = 0; j < h * D; j++) M1n[j] += bL * M1[j];
            for (int j = 0; j < O * h; j++) M2n[j] += bL * M2[j];
        }
    }
    return 0;
}

/* in: the forward's, then its outputs H S g1 inv_r U1 U2 hs work;
 * grad: G1 G2 F1 F2 gU1 gU2 ghs gSk, then for a running read gPa gC gm (NULL = zero);
 * out: dW1 dW2 dM1 dM2 dWa1 dWa2 dk dv deta dalpha dbeta (dalpha, dbeta: NULL = not wanted; the
 * rows shared by several, Nk < N, sum theirs) */
static int backward_rows(const int64_t *cfg, real *const *in, real *const *grad, real *const *out, int64_t s0,
                         int64_t s1)
{
    PROLOGUE(cfg);
    real *const zero = TAKE(each);  /* stands for a missing gradient */
    real *P1 = TAKE(L * h), *P2 = TAKE(L * O), *dSk = TAKE(L * h), *dU1 = TAKE(L * h), *dU2 = TAKE(L * O);
    real *Q1 = TAKE(L * h), *Q2 = TAKE(L * O), *bU = TAKE(each), *dhs = TAKE(L * h), *dRhs = TAKE(L * h);
    real *dG = TAKE(L * L), *dR = TAKE(L * h), *dKK = TAKE(L * L), *dXk = TAKE(L * h), *dCK = TAKE(L * L);
    real *CK = TAKE(L * L), *mdR = TAKE(L * h), *S2 = TAKE(L * L), *de1 = TAKE(L * h), *deps = TAKE(L * O);
    real *dd1 = TAKE(L * h), *dHk = TAKE(L * h), *dY = TAKE(Lz * O), *dS = TAKE(Lz * h), *dZ = TAKE(Lz * D);
    real *dH = TAKE(Lz * h), *pack = TAKE(2 * each), *g2 = TAKE(L * h);
    real *Pa = TAKE(ld * ld), *Pb = TAKE(ld * ld), *C = TAKE(ld * ld), *m = TAKE(L), *mp = TAKE(L);
    real *dPa = TAKE(ld * ld), *dPb = TAKE(ld * ld), *dC = TAKE(ld * ld), *dm = TAKE(L), *X = TAKE(ld * ld);
    GatesGrad d = {.dcl = TAKE(L), .dbl = TAKE(L), .ddl = TAKE(L), .dp0 = TAKE(L), .dPp = TAKE(L * L),
                   .dCp = TAKE(L * L), .dmp = TAKE(L)};
    /* a row's gradients of shared inputs, before they are summed: dk dv deta dalpha dbeta */
    const int shared = Nk < N;
    real *own[5] = {TAKE(L * D), TAKE(L * Dv), TAKE(L), TAKE(L), TAKE(L)};
    const int64_t size[5] = {L * D, L * Dv, L, L, L};
    if (at - base > NTEMP * each) return 2;
    memset(zero, 0, sizeof(real) * each);
    /* a thread takes rows of k, v, ... and, in order, every row that reads them (rows q, q + Nk,
     * ...), so it alone sums their gradients, in the same order for any thread count */
    int64_t lo = s0, hi = s1;  /* the sequence-heads [s0, s1), or (s0 < 0) this thread's share */
    if (s0 < 0) rows(Nk, &lo, &hi);
    if (shared)
        for (int i = 0; i < 5; i++)
            if (out[6 + i]) memset(out[6 + i] + lo * size[i], 0, sizeof(real) * (hi - lo) * size[i]);
    const int64_t G = N / Nk;
    for (int64_t slot = lo * G; slot < hi * G; slot++) {
        const int64_t r = slot % G * Nk + slot / G;  /* 64-bit: the offsets r * rows * cols */
        const real *W1 = in[0] + r * h * D, *W2 = in[1] + r * O * h;
        const real *M1 = mom ? in[2] + r * h * D : 0, *M2 = mom ? in[3] + r * O * h : 0;
        const real *Wa1 = same ? W1 : in[4] + r * h * D, *Wa2 = same ? W2 : in[5] + r * O * h;
        const int64_t rk = r % Nk;
        const real *k = in[6] + rk * L * D, *v = in[7] + rk * L * Dv, *eta = in[8] + rk * L;
        const real rr = resid == 2 ? in[9][r] : resid;
        const real *alpha = in[10] ? in[10] + rk * L : 0, *beta = mom ? in[11] + rk * L : 0;
        const real *H = in[12] + r * Lz * h, *S = in[13] + r * Lz * h, *g1 = in[14] + r * Lz * h;
        const real *inv_r = l2n ? in[15] + r * Lz : 0;
        const real *U1 = in[16] + r * L * h, *U2 = in[17] + r * L * O, *hs = dgd ? in[18] + r * L * h : 0;
        const real *w = in[19] + r * ws;
        const real *eps = w + off[W_EPS], *d1 = w + off[W_D1], *pd1 = w + off[W_PD1], *e1 = w + off[W_E1];
        const real *KK = w + off[W_KK], *Xk = same ? H : w + off[W_XK], *R = w + off[W_R];
        const real *Tinv = w + off[W_TINV], *kM1 = w + off[W_KM1], *left1 = w + off[W_LEFT1];
        const real *left2 = w + off[W_LEFT2];
        const real *G1 = grad[0] ? grad[0] + r * h * D : zero, *G2 = grad[1] ? grad[1] + r * O * h : zero;
        const real *F1 = mom && grad[2] ? grad[2] + r * h * D : zero;
        const real *F2 = mom && grad[3] ? grad[3] + r * O * h : zero;
        const real *gU1 = grad[4] ? grad[4] + r * L * h : 0, *gU2 = grad[5] ? grad[5] + r * L * O : 0;
        const real *ghs = dgd && grad[6] ? grad[6] + r * L * h : 0, *gSk = grad[7] ? grad[7] + r * L * h : 0;
        real *dW1 = out[0] + r * h * D, *dW2 = out[1] + r * O * h;
        real *dM1 = mom ? out[2] + r * h * D : 0, *dM2 = mom ? out[3] + r * O * h : 0;
        real *dWa1 = same ? dW1 : out[4] + r * h * D, *dWa2 = same ? dW2 : out[5] + r * O * h;
        real *dk = shared ? own[0] : out[6] + r * L * D, *dv = shared ? own[1] : out[7] + r * L * Dv;
        real *deta = shared ? own[2] : out[8] + r * L;
        real *dalpha = !out[9] ? 0 : shared ? own[3] : out[9] + r * L;
        real *dbeta = !out[10] ? 0 : shared ? own[4] : out[10] + r * L;
        const Gates g = gates(alpha, beta, L, Pa, Pb, C, m, mp);
        real *dA = &d.dA, *dmL = &d.dmL, *dbL = &d.dbL, *dcl = d.dcl, *dbl = d.dbl, *ddl = d.ddl, *dp0 = d.dp0;
        real *dPp = d.dPp, *dCp = d.dCp, *dmp = d.dmp;
        const real *Sk = S;
        activate(act, H, L * h, 0, 0, g2);  /* act'' at k's rows */

        *dA = dot(G1, W1, h * D) + dot(G2, W2, O * h);
        /* the end state's writes: W_1' += left1^T k, W_2' += left2^T S_k (and the momenta's) */
        gemm(L, h, D, k, D, 1, G1, 1, D, 0, P1, pack);
        gemm(L, O, h, Sk, h, 1, G2, 1, h, 0, P2, pack);
        gemm(L, D, h, left1, h, 1, G1, D, 1, 0, dk, pack);
        gemm(L, h, O, left2, O, 1, G2, h, 1, 0, dSk, pack);
        if (gSk)
            for (int j = 0; j < L * h; j++) dSk[j] += gSk[j];
        for (int t = 0; t < L; t++) {
            const real cl = g.cl[t];
            for (int j = 0; j < h; j++) dU1[t * h + j] = cl * P1[t * h + j] + (gU1 ? gU1[t * h + j] : 0);
            for (int j = 0; j < O; j++) dU2[t * O + j] = cl * P2[t * O + j] + (gU2 ? gU2[t * O + j] : 0);
            dcl[t] = dot(U1 + t * h, P1 + t * h, h) + dot(U2 + t * O, P2 + t * O, O);
        }
        if (mom) {
            *dmL = dot(G1, M1, h * D) + dot(G2, M2, O * h);
            *dbL = dot(F1, M1, h * D) + dot(F2, M2, O * h);
            gemm(L, h, D, k, D, 1, F1, 1, D, 0, Q1, pack);
            gemm(L, O, h, Sk, h, 1, F2, 1, h, 0, Q2, pack);
            for (int t = 0; t < L; t++)
                for (int j = 0; j < h; j++) bU[t * h + j] = g.bl[t] * U1[t * h + j];
            gemm(L, D, h, bU, h, 1, F1, D, 1, 1, dk, pack);
            for (int t = 0; t < L; t++)
                for (int j = 0; j < O; j++) bU[t * O + j] = g.bl[t] * U2[t * O + j];
            gemm(L, h, O, bU, O, 1, F2, h, 1, 1, dSk, pack);
            for (int t = 0; t < L; t++) {
                const real bl = g.bl[t];
                for (int j = 0; j < h; j++) dU1[t * h + j] += bl * Q1[t * h + j];
                for (int j = 0; j < O; j++) dU2[t * O + j] += bl * Q2[t * O + j];
                dbl[t] = dot(U1 + t * h, Q1 + t * h, h) + dot(U2 + t * O, Q2 + t * O, O);
            }
        }
        for (int t = 0; t < L; t++) deta[t] = 0;
        if (dgd) {
            for (int t = 0; t < L; t++) {
                for (int j = 0; j < h; j++)
                    dhs[t * h + j] = g.dl[t] * P1[t * h + j] + (ghs ? ghs[t * h + j] : 0);
                ddl[t] = dot(hs + t * h, P1 + t * h, h);
            }
            /* hs = Tinv (-eta R): the UT transform's backward */
            gemm(L, h, L, Tinv, 1, L, dhs, h, 1, 0, dRhs, pack);
            gemm(L, L, h, dRhs, h, 1, hs, 1, h, 0, dG, pack);
            for (int t = 0; t < L; t++)
                for (int j = 0; j < L; j++) dG[t * L + j] = j < t ? -dG[t * L + j] : 0;
            for (int t = 0; t < L; t++) {
                for (int j = 0; j < h; j++) dR[t * h + j] = -eta[t] * dRhs[t * h + j];
                deta[t] = -dot(R + t * h, dRhs + t * h, h);
                /* G = eta (Pp * KK) */
                for (int j = 0; j < L; j++) {
                    const real dGK = dG[t * L + j] * KK[t * L + j], Pp = g.Pa[t * ld + 1 + j];
                    deta[t] += dGK * Pp;
                    dPp[t * L + j] = eta[t] * dGK;
                    dKK[t * L + j] = eta[t] * dG[t * L + j] * Pp;
                }
                /* R = p0 Xk + (Cp * KK) U1 + mp kM1 */
                dp0[t] = dot(dR + t * h, Xk + t * h, h);
                for (int j = 0; j < h; j++) dXk[t * h + j] = g.Pa[t * ld] * dR[t * h + j];
            }
            gemm(L, L, h, dR, h, 1, U1, 1, h, 0, dCK, pack);
            for (int t = 0; t < L; t++)
                for (int j = 0; j < L; j++) {
                    const real Cp = g.Cp[t * ld + j];
                    dCp[t * L + j] = dCK[t * L + j] * KK[t * L + j];
                    dKK[t * L + j] += dCK[t * L + j] * Cp;
                    CK[t * L + j] = Cp * KK[t * L + j];
                }
            gemm(L, h, L, CK, 1, L, dR, h, 1, 1, dU1, pack);
            if (mom) {
                for (int t = 0; t < L; t++) {
                    dmp[t] = dot(dR + t * h, kM1 + t * h, h);
                    for (int j = 0; j < h; j++) mdR[t * h + j] = g.mp[t] * dR[t * h + j];
                }
                gemm(L, D, h, mdR, h, 1, M1, D, 1, 1, dk, pack);
            }
            gemm(L, D, h, dXk, h, 1, W1, D, 1, 1, dk, pack);
            for (int t = 0; t < L; t++)
                for (int j = 0; j < L; j++) S2[t * L + j] = dKK[t * L + j] + dKK[j * L + t];
            gemm(L, D, L, S2, L, 1, k, D, 1, 1, dk, pack);
        }
        /* U_i = -eta e_i */
        for (int t = 0; t < L; t++) {
            deta[t] -= dot(dU1 + t * h, e1 + t * h, h) + dot(dU2 + t * O, eps + t * O, O);
            for (int j = 0; j < h; j++) de1[t * h + j] = -eta[t] * dU1[t * h + j];
            for (int j = 0; j < O; j++) deps[t * O + j] = -eta[t] * dU2[t * O + j];
        }
        /* e1 = J(H_k)^T d1, d1 = eps W_a2: dd1 = J de1, dHk = d/dH <de1, J^T d1> */
        for (int j = 0; j < L * h; j++) dd1[j] = g1[j] * de1[j];
        if (l2n) {
            project(dd1, S, inv_r, L, h);
            for (int t = 0; t < L; t++) {
                const real *n = S + t * h, *a = d1 + t * h, *pa = pd1 + t * h, *b = de1 + t * h, *g = g1 + t * h;
                real na = 0, nw = 0, aw = 0;
                for (int j = 0; j < h; j++) {
                    const real wj = g[j] * b[j];
                    na += n[j] * a[j];
                    nw += n[j] * wj;
                    aw += a[j] * wj;
                }
                const real ir2 = inv_r[t] * inv_r[t], c = 3 * na * nw - aw;
                for (int j = 0; j < h; j++) {
                    const real wj = g[j] * b[j], du = c * n[j] - nw * a[j] - na * wj;
                    dHk[t * h + j] = g2[t * h + j] * b[j] * pa[j] + g[j] * du * ir2;
                }
            }
        } else {
            for (int j = 0; j < L * h; j++) dHk[j] = g2[j] * d1[j] * de1[j];
        }
        gemm(L, O, h, dd1, h, 1, Wa2, 1, h, 1, deps, pack);
        /* eps = y - target / -target; Y = S W_a2^T + r Z */
        for (int t = 0; t < L; t++)
            for (int j = 0; j < O; j++) {
                dY[t * O + j] = l2obj ? deps[t * O + j] : 0;
                if (self)
                    dY[(L + t) * O + j] = -deps[t * O + j];
                else
                    dv[t * Dv + j] = -deps[t * O + j];
            }
        gemm(Lz, h, O, dY, O, 1, Wa2, h, 1, 0, dS, pack);
        for (int j = 0; j < L * h; j++) dS[j] += dSk[j];
        for (int j = 0; j < Lz * h; j++) dH[j] = dS[j];
        if (l2n) project(dH, S, inv_r, Lz, h);
        for (int j = 0; j < Lz * h; j++) dH[j] *= g1[j];
        for (int j = 0; j < L * h; j++) dH[j] += dHk[j];
        if (rr != 0)  /* a residual needs O == D */
            for (int j = 0; j < Lz * D; j++) dZ[j] = rr * dY[j];
        gemm(Lz, D, h, dH, h, 1, Wa1, D, 1, rr != 0, dZ, pack);
        for (int j = 0; j < L * D; j++) dk[j] += dZ[j];
        if (self) memcpy(dv, dZ + L * D, sizeof(real) * L * D);

        /* the weights' gradients */
        gemm(h, D, L, dH, 1, h, k, D, 1, 0, dWa1, pack);
        if (self) gemm(h, D, L, dH + L * h, 1, h, v, D, 1, 1, dWa1, pack);
        gemm(O, h, L, eps, 1, O, dd1, h, 1, 0, dWa2, pack);
        gemm(O, h, Lz, dY, 1, O, S, h, 1, 1, dWa2, pack);
        if (!same) {
            memset(dW1, 0, sizeof(real) * h * D);
            memset(dW2, 0, sizeof(real) * O * h);
        }
        if (dgd) {
            gemm(h, D, L, dXk, 1, h, k, D, 1, 1, dW1, pack);
            if (mom) gemm(h, D, L, mdR, 1, h, k, D, 1, 0, dM1, pack);
        }
        for (int j = 0; j < h * D; j++) dW1[j] += g.A * G1[j];
        for (int j = 0; j < O * h; j++) dW2[j] += g.A * G2[j];
        if (mom) {
            const real mL = g.mL, bL = g.bL;
            if (!dgd) memset(dM1, 0, sizeof(real) * h * D);
            for (int j = 0; j < h * D; j++) dM1[j] += mL * G1[j] + bL * F1[j];
            for (int j = 0; j < O * h; j++) dM2[j] = mL * G2[j] + bL * F2[j];
        }
        /* the coefficients are views of the gates' segment products */
        const real *gPa = read && grad[8] ? grad[8] + r * ld * ld : 0;
        const real *gC = read && mom && grad[9] ? grad[9] + r * ld * ld : 0;
        const real *gm = read && mom && grad[10] ? grad[10] + r * L : 0;
        gates_backward(&g, &d, gPa, gC, gm, L, dgd, dalpha, dbeta, dPa, dPb, dC, dm, X);
        if (shared)
            for (int i = 0; i < 5; i++)
                if (out[6 + i])
                    for (int64_t j = 0; j < size[i]; j++) out[6 + i][rk * size[i] + j] += own[i][j];
    }
    return 0;
}

int forward(const int64_t *cfg, real *const *in, real *const *out, double eps2)
{
    IN_PARALLEL(forward_rows(cfg, in, out, eps2, -1, -1));
}

/* _group_read.c's forward_heads: the anchor read of the sequence-heads [s0, s1) */
typedef int (*ReadHeads)(const int64_t *cfg, const int64_t *kinds, const double *params, real *const *in,
                         real *const *z, real *const *out, real *const *keep, double eps2, int64_t s0, int64_t s1);

enum { R_IN = 4, R_KEEP = 5, W_IN = 12, W_OUT = 15 };

/* piece j's part of the i-th of a pass's buffers: base[i] + j * stride[i] (NULL stays NULL) */
static inline real *piece(real *const *base, const int64_t *stride, int i, int64_t j)
{
    return base[i] ? base[i] + j * stride[i] : 0;
}

/* Piece j's read pointers rp (W1 W2 x mask, then the G memories' z, outputs and the five kept)
 * and write inputs win (12) from generation_forward's bases and strides: the weights the piece
 * starts from (the call's for piece 0, else piece j - 1's outputs) for both, and the read's
 * outputs as the write's k, v, eta, alpha (``sources``) */
static void piece_inputs(int64_t j, int64_t G, real *const *rbase, const int64_t *rstride, real *const *wbase,
                         const int64_t *wstride, const int64_t *sources, real **rp, real **win)
{
    for (int i = 0; i < R_IN + 2 * G + R_KEEP; i++) rp[i] = piece(rbase, rstride, i, j);
    for (int i = 0; i < W_IN; i++) win[i] = piece(wbase, wstride, i, j);
    for (int i = 0; i < 4 && j; i++) win[i] = piece(wbase, wstride, W_IN + i, j - 1);
    rp[0] = win[0], rp[1] = win[1];
    real *const *outs = rp + R_IN + G;
    win[6] = outs[sources[0]], win[7] = outs[sources[1]], win[8] = outs[sources[2]];
    if (sources[3] >= 0) win[10] = outs[sources[3]];
    else if (sources[3] == -1) win[10] = 0;
}

/* Pass 1 of self-modifying Titans' generating memories (_NativeGeneration in self_modifying.py)
 * over P pieces that each start a chunk (so each reads and writes at the weights it starts
 * from): per piece the stack's anchor read (``read``) and the write on the k, v, eta, alpha it
 * read. A thread takes its sequence-heads through every piece: a head's rows read only that
 * head's outputs, so the pieces need no barrier between them, and a head's weights stay in the
 * thread's cache from one piece to the next. The results are those of the pieces one call at a
 * time (the same rows, the same arithmetic).
 *
 * Piece j's tensors are ``base + j * stride`` (values; stride 0: one tensor for every piece):
 * ``rbase`` the read's W1 W2 x mask (its W1, W2 ignored: the piece's weights), then each
 * memory's addend z, output and the five it keeps (S inv_r g1 Y kept), G each in between;
 * ``wbase`` the write's 12 inputs (W1 W2 M1 M2 for piece 0, the rest ignored where the read or
 * the previous piece gives them) and 15 outputs, whose four weights the last piece writes to
 * ``last`` instead. ``sources``: the read outputs taken as k, v, eta, alpha (alpha -1: none, -2:
 * the write's own input). */
int generation_forward(int64_t P, const int64_t *rcfg, const int64_t *kinds, const double *params, void *read,
                       const int64_t *wcfg, real *const *rbase, const int64_t *rstride, real *const *wbase,
                       const int64_t *wstride, real *const *last, const int64_t *sources, double eps2)
{
    const int64_t G = rcfg[2], heads = wcfg[NK];
    const ReadHeads read_heads = (ReadHeads)read;
    if (G > 8) return 2;  /* (the pointer arrays below hold 8 memories) */
    int status = 0;
#pragma omp parallel
    {
        int64_t s0, s1;
        rows(heads, &s0, &s1);
        real *rp[R_IN + 2 * 8 + R_KEEP], *win[W_IN], *wout[W_OUT];  /* at most 8 memories in a stack */
        for (int64_t j = 0; j < P && !__atomic_load_n(&status, __ATOMIC_RELAXED); j++) {
            piece_inputs(j, G, rbase, rstride, wbase, wstride, sources, rp, win);
            for (int i = 0; i < W_OUT; i++) wout[i] = piece(wbase, wstride, W_IN + i, j);
            for (int i = 0; i < 4 && j == P - 1; i++) wout[i] = last[i];
            real **z = rp + R_IN, **outs = z + G, **keep = outs + G;
            /* (the write's k, v, eta, alpha point at the outputs the read fills first) */
            int s = read_heads(rcfg, kinds, params, rp, z, outs, keep, eps2, s0, s1);
            if (!s) s = forward_rows(wcfg, win, wout, eps2, s0, s1);
            if (s) __atomic_store_n(&status, s, __ATOMIC_RELAXED);
        }
    }
    return status;
}

/* _group_read.c's backward_heads */
typedef int (*ReadBackHeads)(const int64_t *cfg, const int64_t *kinds, const double *params, real *const *in,
                             real *const *grad, real *const *out, real *const *dz, int64_t acc, int64_t s0,
                             int64_t s1);

/* The backward of generation_forward, the pieces in reverse, a thread again taking its
 * sequence-heads: per piece the write's backward, then the read's on its outputs' gradients (the
 * write's of k, v, eta, alpha plus the call's own, ``g``), its weights' gradients added to the
 * write's: the previous piece's. ``rbase``, ``wbase``, ``sources``: generation_forward's (the
 * tensors it kept); ``g``: the gradients of its outputs, the end weights' and momenta's
 * (G1 G2 F1 F2, NULL: zero), then each memory's over the piece (``gstride`` per piece; NULL:
 * zero); ``work``: two sets of dW1 dW2 dM1 dM2 (a piece's gradients, the previous piece's: piece
 * 0 writes the first), then dk dv deta dalpha for one piece; ``obase``: dx, dbeta, then each
 * memory's dz (NULL: not wanted), ``ostride`` per piece. */
int generation_backward(int64_t P, const int64_t *rcfg, const int64_t *kinds, const double *params,
                        void *read_back, const int64_t *wcfg, real *const *rbase, const int64_t *rstride,
                        real *const *wbase, const int64_t *wstride, const int64_t *sources, real *const *g,
                        const int64_t *gstride, real *const *work, real *const *obase, const int64_t *ostride)
{
    const int64_t G = rcfg[2], L = rcfg[3], O = rcfg[6], heads = wcfg[NK];
    const ReadBackHeads back = (ReadBackHeads)read_back;
    if (G > 8) return 2;
    int status = 0;
#pragma omp parallel
    {
        int64_t s0, s1;
        rows(heads, &s0, &s1);
        real *rp[R_IN + 2 * 8 + R_KEEP], *win[W_IN + 8], *wgrad[11] = {0}, *wout[11] = {0};
        real *rin[R_IN + R_KEEP], *rgrad[8], *rout[3], *rdz[8];
        static const int keep[8] = {8, 9, 10, 11, 4, 5, 6, 7};  /* H S g1 inv_r U1 U2 hs work */
        for (int64_t j = P - 1; j >= 0 && !__atomic_load_n(&status, __ATOMIC_RELAXED); j--) {
            piece_inputs(j, G, rbase, rstride, wbase, wstride, sources, rp, win);
            real *const *rkeep = rp + R_IN + 2 * G;
            for (int i = 0; i < 8; i++) win[W_IN + i] = piece(wbase, wstride, W_IN + keep[i], j);
            real *const *mine = work + 4 * (j % 2), *const *later = work + 4 * ((j + 1) % 2);
            for (int i = 0; i < 4; i++) {
                wgrad[i] = j == P - 1 ? g[i] : later[i];
                wout[i] = mine[i];
            }
            for (int i = 0; i < 4; i++) wout[6 + i] = i < 3 || sources[3] >= 0 ? work[8 + i] : 0;
            wout[10] = piece(obase, ostride, 1, j);
            int s = backward_rows(wcfg, win, wgrad, wout, s0, s1);
            /* the read's gradients: a memory's output feeds the write (its gradient there, plus the
             * call's) or not (the call's alone) */
            for (int m = 0; m < G; m++) {
                real *own = 0;
                for (int i = 0; i < 4; i++)
                    if (sources[i] == m) own = wout[6 + i];
                real *gm = piece(g, gstride, 4 + m, j);
                if (own && gm) {
                    const int64_t row = kinds[m] == 2 ? L : L * O;  /* a scalar memory's rows are L long */
                    for (int64_t c = s0 * row; c < s1 * row; c++) own[c] += gm[c];
                }
                rgrad[m] = own ? own : gm;
                rdz[m] = piece(obase, ostride, 2 + m, j);
            }
            for (int i = 0; i < R_IN; i++) rin[i] = rp[i];
            for (int i = 0; i < R_KEEP; i++) rin[R_IN + i] = rkeep[i];
            rout[0] = mine[0], rout[1] = mine[1], rout[2] = obase[0] + j * ostride[0];
            if (!s) s = back(rcfg, kinds, params, rin, rgrad, rout, rdz, 1, s0, s1);
            if (s) __atomic_store_n(&status, s, __ATOMIC_RELAXED);
        }
    }
    return status;
}

int backward(const int64_t *cfg, real *const *in, real *const *grad, real *const *out)
{
    IN_PARALLEL(backward_rows(cfg, in, grad, out, -1, -1));
}

/* this thread's share of activations(), in whole vectors */
static int activations_part(int64_t act, const real *h, int64_t n, real *a, real *d1, real *d2)
{
    int64_t lo, hi;
    vector_rows(n, &lo, &hi);
    if (lo < hi) activate(act, h + lo, hi - lo, a ? a + lo : 0, d1 ? d1 + lo : 0, d2 ? d2 + lo : 0);
    return 0;
}

/* The kernels' activations alone (_native.h), elementwise over torch's threads: a, d1, d2 = act,
 * act', act'' at h (NULL: not wanted). The CMS blocks' hidden layer (cms.py: the value and the
 * derivative in one pass) and the tests. */
int activations(int64_t act, const real *h, int64_t n, real *a, real *d1, real *d2)
{
    IN_PARALLEL(activations_part(act, h, n, a, d1, d2));
}
