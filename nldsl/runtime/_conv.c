/* The short causal depthwise convolution over time on a CPU, forward and backward: _CausalConv in
 * conv.py. Per sequence b, over the padded input full = [state; x] ([T + W - 1, C], the channels
 * contiguous) and the weight w [C, W]:
 *
 *     y[t, c] = sum_j w[c, j] full[t + j, c]
 *
 * one pass over the data per direction, where the torch ops make one per tap. The channels are
 * split over torch's threads (vector_rows, _native.h), each thread's a range of whole vectors: a channel's sums
 * run on one thread, in the same order for any thread count. _native.py builds this file twice,
 * for REAL=float and REAL=double. */
#include "_native.h"

enum { B_, T_, C_, W_ };

/* w [C, W] as wt [W, C] (a tap's weights contiguous over the channels), channels [c0, c1) */
static void taps(const real *w, int64_t C, int W, int64_t c0, int64_t c1, real *wt)
{
    for (int64_t c = c0; c < c1; c++)
        for (int j = 0; j < W; j++) wt[j * C + c] = w[c * W + j];
}

static int forward_channels(const int64_t *cfg, const real *full, const real *w, real *y)
{
    const int64_t B = cfg[B_], T = cfg[T_], C = cfg[C_];
    const int W = cfg[W_];
    real *wt = scratch_block(W * C);
    if (!wt) return 1;
    int64_t c0, c1;
    vector_rows(C, &c0, &c1);  /* this thread's channels */
    taps(w, C, W, c0, c1, wt);
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const real *f = full + (b * (T + W - 1) + t) * C;
            real *o = y + (b * T + t) * C;
            for (int64_t c = c0; c < c1; c++) o[c] = wt[(W - 1) * C + c] * f[(W - 1) * C + c];
            for (int j = 0; j < W - 1; j++)
                for (int64_t c = c0; c < c1; c++) o[c] += wt[j * C + c] * f[j * C + c];
        }
    return 0;
}

/* d_full[s, c] = sum_j w[c, j] gy[s - j, c] (0 <= s - j < T); d_w[c, j] = sum_{b, t} gy[t, c]
 * full[t + j, c]; either NULL: not wanted */
static int backward_channels(const int64_t *cfg, const real *full, const real *w, const real *gy, real *d_full,
                             real *d_w)
{
    const int64_t B = cfg[B_], T = cfg[T_], C = cfg[C_];
    const int W = cfg[W_];
    real *wt = scratch_block(2 * W * C);
    if (!wt) return 1;
    real *dwt = wt + W * C;
    int64_t c0, c1;
    vector_rows(C, &c0, &c1);  /* this thread's channels */
    const int64_t n = c1 - c0;
    taps(w, C, W, c0, c1, wt);
    for (int j = 0; j < W; j++) memset(dwt + j * C + c0, 0, sizeof(real) * n);
    for (int64_t b = 0; b < B; b++) {
        const real *fb = full + b * (T + W - 1) * C, *gb = gy + b * T * C;
        if (d_full) {
            real *db = d_full + b * (T + W - 1) * C;
            for (int64_t s = 0; s < T + W - 1; s++) {
                real *o = db + s * C;
                memset(o + c0, 0, sizeof(real) * n);
                for (int j = 0; j < W; j++) {
                    if (s - j < 0 || s - j >= T) continue;
                    const real *g = gb + (s - j) * C;
                    for (int64_t c = c0; c < c1; c++) o[c] += wt[j * C + c] * g[c];
                }
            }
        }
        if (d_w)
            for (int64_t t = 0; t < T; t++) {
                const real *g = gb + t * C;
                for (int j = 0; j < W; j++)
                    for (int64_t c = c0; c < c1; c++) dwt[j * C + c] += g[c] * fb[(t + j) * C + c];
            }
    }
    if (d_w)
        for (int64_t c = c0; c < c1; c++)
            for (int j = 0; j < W; j++) d_w[c * W + j] = dwt[j * C + c];
    return 0;
}

int forward(const int64_t *cfg, const real *full, const real *w, real *y)
{
    IN_PARALLEL(forward_channels(cfg, full, w, y));
}

int backward(const int64_t *cfg, const real *full, const real *w, const real *gy, real *d_full, real *d_w)
{
    IN_PARALLEL(backward_channels(cfg, full, w, gy, d_full, d_w));
}
