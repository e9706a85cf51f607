/* Fused per-chunk loops of the HDR engine (optional speed-up; ckptops/hdr/fused.py falls back to
 * torch ops when this module is not built).
 *
 * Why: the torch version of a chunk makes 8-10 passes over memory (convert, subtract, abs,
 * compare, mask, scale, subtract, check, round), each a separate kernel call that goes through
 * the interpreter and the GIL. One loop per element does the same arithmetic in registers.
 *
 * Exactness: every step is the float32 operation the torch path performs, in the same order
 * (tau = h - b; s = |tau| > lambda ? tau : +0; s = s * (float)scale; r = t - s), with no
 * contraction into fused multiply-adds (built with -ffp-contract=off), and bfloat16 output is
 * rounded to nearest even exactly as c10::BFloat16 does for finite values. The tests compare
 * both paths with an independent reference bit for bit.
 *
 * Inputs are float32 (kind 0) or raw bfloat16 (kind 1) buffers; float16 inputs are converted to
 * float32 by the caller first. The loops are branch-free so that they vectorise; on x86-64 Linux
 * an AVX2 clone is picked at load time where the CPU has it. Every function releases the GIL
 * while it loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define KIND_F32 0
#define KIND_BF16 1

/* AVX2 clones need ifunc support (glibc); elsewhere the portable loop alone is built */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef MULTIVERSION
#define MULTIVERSION
#endif

#define ABS_MASK 0x7FFFFFFFu
#define EXP_MASK 0x7F800000u

static inline uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float bits_f32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

static inline float load(const void *p, int kind, Py_ssize_t i) {
    if (kind == KIND_BF16)
        return bits_f32((uint32_t)((const uint16_t *)p)[i] << 16);
    return ((const float *)p)[i];
}

/* ---------------------------------------------------------------- band counting */

typedef struct {
    long long below, above, peak;
    uint32_t worst;
} BandResult;

#define BLOCK 64

/* Vector part over blocks of BLOCK values (|tau| bits kept in a small array, below/above counted
 * branch-free), then a scalar look at the few blocks that hold in-band values. ``hk``/``bk`` are
 * constants at each call site, so every input-kind pair gets its own specialised loop. With ``idx``
 * set (the one-read pass), every in-band value is also recorded: its index in the chunk, its signed
 * tau, the target and base values (as float32), so that it can be corrected once the exact threshold
 * is known; returns how many were recorded. With ``idx`` NULL (a constant at the band call sites)
 * the recording is compiled out. */
static inline __attribute__((always_inline)) Py_ssize_t collect_body(const void *h, int hk, const void *b, int bk,
                                                                     const void *t, int tk, Py_ssize_t n,
                                                                     uint32_t lo, uint32_t size, int shift,
                                                                     int64_t *counts, BandResult *res, uint32_t *idx,
                                                                     float *taus, float *targets, float *bases) {
    long long below = 0, above = 0;
    long long peak = (long long)lo - 1;
    uint32_t worst = 0;
    const uint32_t hi = lo + size;
    Py_ssize_t found = 0;
    uint32_t ms[BLOCK];
    for (Py_ssize_t s = 0; s < n; s += BLOCK) {
        Py_ssize_t len = n - s < BLOCK ? n - s : BLOCK;
        uint32_t bl = 0, ab = 0, wb = 0;
        for (Py_ssize_t i = 0; i < len; i++) {
            uint32_t m = f32_bits(load(h, hk, s + i) - load(b, bk, s + i)) & ABS_MASK;
            ms[i] = m;
            wb = m > wb ? m : wb;
            bl += m < lo;
            ab += m >= hi;
        }
        worst = wb > worst ? wb : worst;
        below += bl;
        above += ab;
        if (bl + ab < (uint32_t)len) {
            for (Py_ssize_t i = 0; i < len; i++) {
                uint32_t d = ms[i] - lo;
                if (d < size) {
                    counts[1 + (d >> shift)]++;
                    if ((long long)ms[i] > peak)
                        peak = ms[i];
                    if (idx) {
                        idx[found] = (uint32_t)(s + i);
                        taus[found] = load(h, hk, s + i) - load(b, bk, s + i);
                        targets[found] = load(t, tk, s + i);
                        bases[found] = load(b, bk, s + i);
                        found++;
                    }
                }
            }
        }
    }
    res->below = below;
    res->above = above;
    res->peak = above ? (long long)hi : peak;
    res->worst = worst;
    return found;
}

static inline __attribute__((always_inline)) void band_body(const void *h, int hk, const void *b, int bk,
                                                             Py_ssize_t n, uint32_t lo, uint32_t size,
                                                             int64_t *counts, BandResult *res) {
    collect_body(h, hk, b, bk, NULL, KIND_F32, n, lo, size, 0, counts, res, NULL, NULL, NULL, NULL);
}

#define BAND_VARIANT(name, HK, BK)                                                                     \
    MULTIVERSION static void name(const void *h, const void *b, Py_ssize_t n, uint32_t lo, uint32_t size, \
                                  int64_t *counts, BandResult *res) {                                   \
        band_body(h, HK, b, BK, n, lo, size, counts, res);                                             \
    }
BAND_VARIANT(band_bf16_bf16, KIND_BF16, KIND_BF16)
BAND_VARIANT(band_f32_f32, KIND_F32, KIND_F32)
BAND_VARIANT(band_bf16_f32, KIND_BF16, KIND_F32)
BAND_VARIANT(band_f32_bf16, KIND_F32, KIND_BF16)

static int check_buffer(Py_buffer *buf, int kind, Py_ssize_t n, const char *what) {
    Py_ssize_t need = n * (kind == KIND_BF16 ? 2 : 4);
    if (kind != KIND_F32 && kind != KIND_BF16) {
        PyErr_Format(PyExc_ValueError, "%s: unknown kind %d", what, kind);
        return -1;
    }
    if (n < 0 || buf->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: buffer holds %zd bytes, %zd needed", what, buf->len, need);
        return -1;
    }
    return 0;
}

/* band_count(h, h_kind, b, b_kind, n, lo, size, hist) -> (finite, peak)
 * Adds to the int64 buffer hist (size + 2 counters) the bit patterns of |h - b|: hist[0] those
 * below lo, hist[1 + p - lo] each pattern p in [lo, lo + size), hist[size + 1] those above.
 * finite is False when some tau is NaN/Inf (hist is then meaningless: the run stops). peak is
 * lo + size if a value lies above the band, else the largest in-band pattern, else lo - 1. */
static PyObject *band_count(PyObject *self, PyObject *args) {
    Py_buffer h, b, hist;
    int hk, bk;
    Py_ssize_t n;
    long long lo, size;
    if (!PyArg_ParseTuple(args, "y*iy*inLLw*", &h, &hk, &b, &bk, &n, &lo, &size, &hist))
        return NULL;
    PyObject *result = NULL;
    if (check_buffer(&h, hk, n, "h") || check_buffer(&b, bk, n, "b"))
        goto done;
    if (size < 1 || lo < 0 || lo + size > 0x80000000LL || hist.len < (Py_ssize_t)((size + 2) * 8)) {
        PyErr_SetString(PyExc_ValueError, "band_count: bad band or histogram size");
        goto done;
    }
    int64_t *counts = (int64_t *)hist.buf;
    BandResult r;
    Py_BEGIN_ALLOW_THREADS
    const uint32_t ulo = (uint32_t)lo, usize = (uint32_t)size;
    if (hk == KIND_BF16 && bk == KIND_BF16)
        band_bf16_bf16(h.buf, b.buf, n, ulo, usize, counts, &r);
    else if (hk == KIND_F32 && bk == KIND_F32)
        band_f32_f32(h.buf, b.buf, n, ulo, usize, counts, &r);
    else if (hk == KIND_BF16)
        band_bf16_f32(h.buf, b.buf, n, ulo, usize, counts, &r);
    else
        band_f32_bf16(h.buf, b.buf, n, ulo, usize, counts, &r);
    counts[0] += r.below;
    counts[size + 1] += r.above;
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OL)", r.worst >= EXP_MASK ? Py_False : Py_True, r.peak);
done:
    PyBuffer_Release(&h);
    PyBuffer_Release(&b);
    PyBuffer_Release(&hist);
    return result;
}

/* ---------------------------------------------------------------- band collection (one read) */

#define COLLECT_VARIANT(name, HK, BK)                                                                  \
    MULTIVERSION static Py_ssize_t name(const void *h, const void *b, const void *t, int tk, Py_ssize_t n, \
                                        uint32_t lo, uint32_t size, int shift, int64_t *counts,           \
                                        BandResult *res, uint32_t *idx, float *taus, float *targets,      \
                                        float *bases) {                                                   \
        return collect_body(h, HK, b, BK, t, tk, n, lo, size, shift, counts, res, idx, taus, targets,    \
                            bases);                                                                       \
    }
COLLECT_VARIANT(collect_bf16_bf16, KIND_BF16, KIND_BF16)
COLLECT_VARIANT(collect_f32_f32, KIND_F32, KIND_F32)
COLLECT_VARIANT(collect_bf16_f32, KIND_BF16, KIND_F32)
COLLECT_VARIANT(collect_f32_bf16, KIND_F32, KIND_BF16)

/* band_collect(h, h_kind, b, b_kind, t, t_kind, n, lo, size, shift, hist, idx, taus, targets, bases)
 *   -> (finite, peak, found)
 * band_count with in-band patterns counted 2**shift to a counter (hist: ((size - 1) >> shift) + 3
 * counters; the last counts those above), and for every |tau| pattern inside [lo, lo + size): its
 * index (uint32), tau, the target and the base value (float32) appended to idx/taus/targets/bases
 * (each with room for n entries). */
static PyObject *band_collect(PyObject *self, PyObject *args) {
    Py_buffer h, b, t, hist, idx, taus, targets, bases;
    int hk, bk, tk, shift;
    Py_ssize_t n;
    long long lo, size;
    if (!PyArg_ParseTuple(args, "y*iy*iy*inLLiw*w*w*w*w*", &h, &hk, &b, &bk, &t, &tk, &n, &lo, &size, &shift, &hist,
                          &idx, &taus, &targets, &bases))
        return NULL;
    PyObject *result = NULL;
    if (check_buffer(&h, hk, n, "h") || check_buffer(&b, bk, n, "b") || check_buffer(&t, tk, n, "t") ||
        check_buffer(&idx, KIND_F32, n, "idx") || check_buffer(&taus, KIND_F32, n, "taus") ||
        check_buffer(&targets, KIND_F32, n, "targets") || check_buffer(&bases, KIND_F32, n, "bases"))
        goto done;
    if (size < 1 || lo < 0 || lo + size > 0x80000000LL || shift < 0 || shift > 30 ||
        hist.len < (Py_ssize_t)((((size - 1) >> shift) + 3) * 8)) {
        PyErr_SetString(PyExc_ValueError, "band_collect: bad band, shift or histogram size");
        goto done;
    }
    int64_t *counts = (int64_t *)hist.buf;
    BandResult r;
    Py_ssize_t found;
    const Py_ssize_t last = ((size - 1) >> shift) + 2;
    Py_BEGIN_ALLOW_THREADS
    const uint32_t ulo = (uint32_t)lo, usize = (uint32_t)size;
    uint32_t *ip = (uint32_t *)idx.buf;
    float *tp = (float *)taus.buf, *gp = (float *)targets.buf, *bp = (float *)bases.buf;
    if (hk == KIND_BF16 && bk == KIND_BF16)
        found = collect_bf16_bf16(h.buf, b.buf, t.buf, tk, n, ulo, usize, shift, counts, &r, ip, tp, gp, bp);
    else if (hk == KIND_F32 && bk == KIND_F32)
        found = collect_f32_f32(h.buf, b.buf, t.buf, tk, n, ulo, usize, shift, counts, &r, ip, tp, gp, bp);
    else if (hk == KIND_BF16)
        found = collect_bf16_f32(h.buf, b.buf, t.buf, tk, n, ulo, usize, shift, counts, &r, ip, tp, gp, bp);
    else
        found = collect_f32_bf16(h.buf, b.buf, t.buf, tk, n, ulo, usize, shift, counts, &r, ip, tp, gp, bp);
    counts[0] += r.below;
    counts[last] += r.above;
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OLn)", r.worst >= EXP_MASK ? Py_False : Py_True, r.peak, found);
done:
    PyBuffer_Release(&h);
    PyBuffer_Release(&b);
    PyBuffer_Release(&t);
    PyBuffer_Release(&hist);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&taus);
    PyBuffer_Release(&targets);
    PyBuffer_Release(&bases);
    return result;
}

/* ---------------------------------------------------------------- the update */

typedef struct {
    uint32_t bad, nonzero;
} ApplyResult;

/* The five float64 sums of the drift diagnosis (ckptops/hdr/drift.py), over the chunk:
 * sum d^2, sum tau^2, sum d*tau, sum (M tau)^2, sum d*(M tau), with d = (double)t - (double)b
 * (exact: both are float32 values), tau the float32 tau and M tau the selected float32 tau.
 * They are kept in LANES independent partial sums so that the compiler can vectorise them
 * without reassociating floating-point additions (which -fno-fast-math forbids); the lanes are
 * added up once per call. Nothing here touches the output: its bits are the same with or
 * without sums. */
#define LANES 8
#define NSUMS 5

/* keep_bits: 0xFFFFFFFF-style mask of the selected entries. With shrinking, |tau| > lambda
 * (lambda >= 0, so comparing bit patterns is comparing values) keeps tau and anything else
 * becomes +0.0, as torch.hardshrink does; without, tau is kept as it is (-0.0 included).
 * ``with_sums`` is a constant at every call site: 0 compiles the sums away. */
/* Add one block's terms to the LANES-wide partial sums. GCC/Clang vector extensions keep the
 * lanes independent (four float64 per vector, two vectors per sum); other compilers get the same
 * sums lane by lane. */
#if defined(__GNUC__)
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
/* four floats widened to float64 (a macro: an inline function returning v4d warns about the
 * AVX ABI in the default clone) */
#define LOAD4(p) __extension__({ v4f v_; memcpy(&v_, (p), sizeof(v_)); __builtin_convertvector(v_, v4d); })
#endif

static inline __attribute__((always_inline)) void add_sums(const float *tvs, const float *bvs, const float *taus,
                                                            const float *ms, Py_ssize_t len,
                                                            double acc[NSUMS][LANES]) {
    Py_ssize_t j = 0;
#if defined(__GNUC__)
    v4d a[NSUMS][2];
    for (int k = 0; k < NSUMS; k++)
        for (int q = 0; q < 2; q++)
            memcpy(&a[k][q], &acc[k][4 * q], sizeof(v4d));
    for (; j + LANES <= len; j += LANES)
        for (int q = 0; q < 2; q++) {
            Py_ssize_t o = j + 4 * q;
            v4d d = LOAD4(tvs + o) - LOAD4(bvs + o), x = LOAD4(taus + o), m = LOAD4(ms + o);
            a[0][q] += d * d;
            a[1][q] += x * x;
            a[2][q] += d * x;
            a[3][q] += m * m;
            a[4][q] += d * m;
        }
    for (int k = 0; k < NSUMS; k++)
        for (int q = 0; q < 2; q++)
            memcpy(&acc[k][4 * q], &a[k][q], sizeof(v4d));
#endif
    for (; j < len; j++) {
        int l = (int)(j % LANES);
        double d = (double)tvs[j] - (double)bvs[j], x = taus[j], m = ms[j];
        acc[0][l] += d * d;
        acc[1][l] += x * x;
        acc[2][l] += d * x;
        acc[3][l] += m * m;
        acc[4][l] += d * m;
    }
}

static inline __attribute__((always_inline)) void apply_body(const void *h, int hk, const void *b, int bk,
                                                              const void *t, int tk, Py_ssize_t n,
                                                              uint32_t lam_bits, uint32_t all, float scale,
                                                              void *out, int ok, ApplyResult *res,
                                                              int with_sums, double *sums) {
    uint32_t bad = 0, nonzero = 0;
    double acc[NSUMS][LANES];
    memset(acc, 0, sizeof(acc));
    float tvs[BLOCK], bvs[BLOCK], taus[BLOCK], ms[BLOCK];
    for (Py_ssize_t s0 = 0; s0 < n; s0 += BLOCK) {
        Py_ssize_t len = n - s0 < BLOCK ? n - s0 : BLOCK;
        for (Py_ssize_t j = 0; j < len; j++) {
            Py_ssize_t i = s0 + j;
            float bv = load(b, bk, i), tv = load(t, tk, i);
            float tau = load(h, hk, i) - bv;
            uint32_t tb = f32_bits(tau);
            uint32_t keep = all | -(uint32_t)((tb & ABS_MASK) > lam_bits);
            uint32_t sb = tb & keep;
            nonzero |= sb & ABS_MASK;
            float masked = bits_f32(sb);
            float s = masked * scale;
            uint32_t r = f32_bits(tv - s);
            bad |= (uint32_t)((r & EXP_MASK) == EXP_MASK);
            if (ok == KIND_BF16)
                ((uint16_t *)out)[i] = (uint16_t)((r + 0x7FFFu + ((r >> 16) & 1u)) >> 16);
            else
                ((uint32_t *)out)[i] = r;
            if (with_sums) {
                tvs[j] = tv;
                bvs[j] = bv;
                taus[j] = tau;
                ms[j] = masked;
            }
        }
        if (with_sums)
            add_sums(tvs, bvs, taus, ms, len, acc);
    }
    if (with_sums)
        for (int k = 0; k < NSUMS; k++) {
            double total = 0.0;
            for (int l = 0; l < LANES; l++)
                total += acc[k][l];
            sums[k] += total;
        }
    res->bad = bad;
    res->nonzero = nonzero;
}

#define APPLY_VARIANT(name, HK, BK, TK, OK, WS)                                                       \
    MULTIVERSION static void name(const void *h, const void *b, const void *t, Py_ssize_t n,          \
                                  uint32_t lam_bits, uint32_t all, float scale, void *out,              \
                                  ApplyResult *res, double *sums) {                                     \
        apply_body(h, HK, b, BK, t, TK, n, lam_bits, all, scale, out, OK, res, WS, sums);              \
    }
APPLY_VARIANT(apply_bf16_to_bf16, KIND_BF16, KIND_BF16, KIND_BF16, KIND_BF16, 0)
APPLY_VARIANT(apply_f32_to_f32, KIND_F32, KIND_F32, KIND_F32, KIND_F32, 0)
APPLY_VARIANT(apply_bf16_to_f32, KIND_BF16, KIND_BF16, KIND_BF16, KIND_F32, 0)
APPLY_VARIANT(apply_bf16_to_bf16_sums, KIND_BF16, KIND_BF16, KIND_BF16, KIND_BF16, 1)
APPLY_VARIANT(apply_f32_to_f32_sums, KIND_F32, KIND_F32, KIND_F32, KIND_F32, 1)
APPLY_VARIANT(apply_bf16_to_f32_sums, KIND_BF16, KIND_BF16, KIND_BF16, KIND_F32, 1)
/* LoRA inputs: tau_H from an adapter is float32 against a float32 zero base, and a target
 * "base + adapter" is float32 against bfloat16 tau inputs; without their own loops these took
 * apply_mixed, whose per-element kind lookups do not vectorise (+2.4 s on a 1.1B model) */
APPLY_VARIANT(apply_lora_tau_to_bf16, KIND_F32, KIND_F32, KIND_BF16, KIND_BF16, 0)
APPLY_VARIANT(apply_lora_tau_to_bf16_sums, KIND_F32, KIND_F32, KIND_BF16, KIND_BF16, 1)
APPLY_VARIANT(apply_lora_target_to_bf16, KIND_BF16, KIND_BF16, KIND_F32, KIND_BF16, 0)
APPLY_VARIANT(apply_lora_target_to_bf16_sums, KIND_BF16, KIND_BF16, KIND_F32, KIND_BF16, 1)

/* any other mix of kinds: the same arithmetic with the kinds looked up per element */
static void apply_mixed(const void *h, int hk, const void *b, int bk, const void *t, int tk, Py_ssize_t n,
                        uint32_t lam_bits, uint32_t all, float scale, void *out, int ok, ApplyResult *res,
                        double *sums) {
    if (sums)
        apply_body(h, hk, b, bk, t, tk, n, lam_bits, all, scale, out, ok, res, 1, sums);
    else
        apply_body(h, hk, b, bk, t, tk, n, lam_bits, all, scale, out, ok, res, 0, sums);
}

/* apply(h, h_kind, b, b_kind, t, t_kind, n, shrink, use_shrink, scale, out, out_kind[, sums])
 *   -> (finite, changed)
 * out[i] = t - ((|tau| > shrink or not use_shrink) ? tau : +0) * (float)scale, written as float32
 * (out_kind 0) or bfloat16 rounded to nearest even (out_kind 1). finite is False when a result
 * is NaN/Inf (out is then partly written and must be discarded); changed is True when some
 * selected tau is non-zero. shrink must be >= 0. sums, when given (a writable buffer of five
 * float64), gets the chunk's drift sums added to it (see apply_one); out is the same either way. */
static PyObject *apply(PyObject *self, PyObject *args) {
    Py_buffer h, b, t, out, sums_buf;
    int hk, bk, tk, ok, use_shrink;
    Py_ssize_t n;
    float shrink, scale;
    PyObject *sums_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*iy*iy*infpfw*i|O", &h, &hk, &b, &bk, &t, &tk, &n, &shrink, &use_shrink,
                          &scale, &out, &ok, &sums_obj))
        return NULL;
    PyObject *result = NULL;
    double *sums = NULL;
    sums_buf.obj = NULL;
    if (sums_obj != Py_None) {
        if (PyObject_GetBuffer(sums_obj, &sums_buf, PyBUF_WRITABLE) < 0)
            goto done;
        if (sums_buf.len < (Py_ssize_t)(NSUMS * sizeof(double))) {
            PyErr_SetString(PyExc_ValueError, "apply: sums must hold five float64");
            goto done;
        }
        sums = (double *)sums_buf.buf;
    }
    if (check_buffer(&h, hk, n, "h") || check_buffer(&b, bk, n, "b") || check_buffer(&t, tk, n, "t") ||
        check_buffer(&out, ok, n, "out"))
        goto done;
    if (!(shrink >= 0.0f)) {
        PyErr_SetString(PyExc_ValueError, "apply: shrink must be >= 0");
        goto done;
    }
    ApplyResult r;
    Py_BEGIN_ALLOW_THREADS
    const uint32_t lam_bits = f32_bits(shrink), all = use_shrink ? 0u : 0xFFFFFFFFu;
    if (hk == KIND_BF16 && bk == KIND_BF16 && tk == KIND_BF16 && ok == KIND_BF16)
        (sums ? apply_bf16_to_bf16_sums : apply_bf16_to_bf16)(h.buf, b.buf, t.buf, n, lam_bits, all, scale, out.buf, &r, sums);
    else if (hk == KIND_F32 && bk == KIND_F32 && tk == KIND_F32 && ok == KIND_F32)
        (sums ? apply_f32_to_f32_sums : apply_f32_to_f32)(h.buf, b.buf, t.buf, n, lam_bits, all, scale, out.buf, &r, sums);
    else if (hk == KIND_BF16 && bk == KIND_BF16 && tk == KIND_BF16 && ok == KIND_F32)
        (sums ? apply_bf16_to_f32_sums : apply_bf16_to_f32)(h.buf, b.buf, t.buf, n, lam_bits, all, scale, out.buf, &r, sums);
    else if (hk == KIND_F32 && bk == KIND_F32 && tk == KIND_BF16 && ok == KIND_BF16)
        (sums ? apply_lora_tau_to_bf16_sums : apply_lora_tau_to_bf16)(h.buf, b.buf, t.buf, n, lam_bits, all, scale, out.buf, &r, sums);
    else if (hk == KIND_BF16 && bk == KIND_BF16 && tk == KIND_F32 && ok == KIND_BF16)
        (sums ? apply_lora_target_to_bf16_sums : apply_lora_target_to_bf16)(h.buf, b.buf, t.buf, n, lam_bits, all, scale, out.buf, &r, sums);
    else
        apply_mixed(h.buf, hk, b.buf, bk, t.buf, tk, n, lam_bits, all, scale, out.buf, ok, &r, sums);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(OO)", r.bad ? Py_False : Py_True, r.nonzero ? Py_True : Py_False);
done:
    PyBuffer_Release(&h);
    PyBuffer_Release(&b);
    PyBuffer_Release(&t);
    PyBuffer_Release(&out);
    if (sums_buf.obj != NULL)
        PyBuffer_Release(&sums_buf);
    return result;
}

/* XXH64 (xxHash, 64-bit, seed 0), streaming: the checksum every sanitize run takes of its output
 * shards for the --resume journal (see ckptops/checkpoint/checksum.py), fed the bytes as they are
 * written. Why here: zlib's CRC-32 (~4 GB/s) cost a 1B-parameter run 0.6-0.8 s of CPU out of ~5;
 * XXH64 runs at ~11 GB/s. The reference algorithm (xxhash.c), little-endian reads; its state
 * lives in a bytearray of XXH64_STATE bytes that the caller owns. */
#define XXH_P1 0x9E3779B185EBCA87ULL
#define XXH_P2 0xC2B2AE3D27D4EB4FULL
#define XXH_P3 0x165667B19E3779F9ULL
#define XXH_P4 0x85EBCA77C2B2AE63ULL
#define XXH_P5 0x27D4EB2F165667C5ULL

typedef struct {
    uint64_t v[4];
    uint64_t total;
    unsigned char mem[32];
    uint64_t memsize;
} xxh_state;

static inline uint64_t xxh_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t xxh_read64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t xxh_read32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t xxh_round(uint64_t acc, uint64_t input) {
    acc += input * XXH_P2;
    return xxh_rotl(acc, 31) * XXH_P1;
}
static inline uint64_t xxh_merge(uint64_t acc, uint64_t v) {
    acc ^= xxh_round(0, v);
    return acc * XXH_P1 + XXH_P4;
}

static void xxh_reset(xxh_state *st) {
    memset(st, 0, sizeof(*st));
    st->v[0] = XXH_P1 + XXH_P2;
    st->v[1] = XXH_P2;
    st->v[2] = 0;
    st->v[3] = 0 - XXH_P1;
}

static void xxh_stripes(xxh_state *st, const unsigned char *p, size_t stripes) {
    uint64_t v1 = st->v[0], v2 = st->v[1], v3 = st->v[2], v4 = st->v[3];
    for (size_t i = 0; i < stripes; i++, p += 32) {
        v1 = xxh_round(v1, xxh_read64(p));
        v2 = xxh_round(v2, xxh_read64(p + 8));
        v3 = xxh_round(v3, xxh_read64(p + 16));
        v4 = xxh_round(v4, xxh_read64(p + 24));
    }
    st->v[0] = v1, st->v[1] = v2, st->v[2] = v3, st->v[3] = v4;
}

static void xxh_update(xxh_state *st, const unsigned char *p, size_t len) {
    st->total += len;
    if (st->memsize + len < 32) {
        memcpy(st->mem + st->memsize, p, len);
        st->memsize += len;
        return;
    }
    if (st->memsize) {
        size_t fill = 32 - st->memsize;
        memcpy(st->mem + st->memsize, p, fill);
        xxh_stripes(st, st->mem, 1);
        p += fill;
        len -= fill;
        st->memsize = 0;
    }
    xxh_stripes(st, p, len / 32);
    p += len / 32 * 32;
    len %= 32;
    memcpy(st->mem, p, len);
    st->memsize = len;
}

static uint64_t xxh_digest(const xxh_state *st) {
    uint64_t h;
    const unsigned char *p = st->mem, *end = st->mem + st->memsize;
    if (st->total >= 32) {
        h = xxh_rotl(st->v[0], 1) + xxh_rotl(st->v[1], 7) + xxh_rotl(st->v[2], 12) + xxh_rotl(st->v[3], 18);
        for (int i = 0; i < 4; i++)
            h = xxh_merge(h, st->v[i]);
    } else {
        h = XXH_P5;
    }
    h += st->total;
    while (p + 8 <= end) {
        h ^= xxh_round(0, xxh_read64(p));
        h = xxh_rotl(h, 27) * XXH_P1 + XXH_P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)xxh_read32(p) * XXH_P1;
        h = xxh_rotl(h, 23) * XXH_P2 + XXH_P3;
        p += 4;
    }
    while (p < end) {
        h ^= (*p) * XXH_P5;
        h = xxh_rotl(h, 11) * XXH_P1;
        p++;
    }
    h ^= h >> 33;
    h *= XXH_P2;
    h ^= h >> 29;
    h *= XXH_P3;
    h ^= h >> 32;
    return h;
}

/* xxh64_update(state, data) -> None; xxh64_update(state) resets the state. */
static PyObject *py_xxh64_update(PyObject *self, PyObject *args) {
    Py_buffer state, data = {0};
    if (!PyArg_ParseTuple(args, "w*|y*", &state, &data))
        return NULL;
    if (state.len != (Py_ssize_t)sizeof(xxh_state)) {
        PyBuffer_Release(&state);
        if (data.obj != NULL)
            PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "xxh64 state of the wrong size");
        return NULL;
    }
    if (data.obj == NULL) {
        xxh_reset((xxh_state *)state.buf);
    } else {
        Py_BEGIN_ALLOW_THREADS
        xxh_update((xxh_state *)state.buf, (const unsigned char *)data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&data);
    }
    PyBuffer_Release(&state);
    Py_RETURN_NONE;
}

static PyObject *py_xxh64_digest(PyObject *self, PyObject *args) {
    Py_buffer state;
    uint64_t h;
    if (!PyArg_ParseTuple(args, "y*", &state))
        return NULL;
    if (state.len != (Py_ssize_t)sizeof(xxh_state)) {
        PyBuffer_Release(&state);
        PyErr_SetString(PyExc_ValueError, "xxh64 state of the wrong size");
        return NULL;
    }
    h = xxh_digest((const xxh_state *)state.buf);
    PyBuffer_Release(&state);
    return PyLong_FromUnsignedLongLong(h);
}

/* ---------------------------------------------------------------- LoRA products */

/* out (rows x cols) = left (rows x rank) @ right (rank x cols), float32, each element summed over
 * k = 0..rank-1 in order (fl(fl(l0 r0 + l1 r1) + l2 r2) ...; no fused multiply-add), then times
 * post_scale when it is not 1. Why here: a LoRA tau_H is formed chunk by chunk from its factors;
 * with this loop the adapter path needs no torch (whose import alone took 1.4 s) and the result
 * does not depend on a BLAS library's blocking or thread count. The loop runs along a row of
 * ``right`` for each k, so it vectorises; a row of ``out`` stays in L1. */
#define LORA_COLS 32
/* eight float32 lanes (GCC/Clang vector extension: AVX registers in the AVX2 clone, split into
 * narrower ones elsewhere) */
typedef float v8f __attribute__((vector_size(32)));

/* one row, columns [j0, j1): the plain loop (the remainder of the blocked one) */
static inline __attribute__((always_inline)) void lora_row_tail(const float *restrict l, const float *restrict right,
                                                                  Py_ssize_t rank, Py_ssize_t cols, Py_ssize_t j0,
                                                                  Py_ssize_t j1, float *restrict o) {
    for (Py_ssize_t j = j0; j < j1; j++) {
        float acc = l[0] * right[j];
        for (Py_ssize_t k = 1; k < rank; k++)
            acc = acc + l[k] * right[k * cols + j];
        o[j] = acc;
    }
}

MULTIVERSION static void lora_rows_body(const float *restrict left, const float *restrict right, Py_ssize_t rows,
                                        Py_ssize_t rank, Py_ssize_t cols, float *restrict out, float post_scale) {
    /* blocks of LORA_COLS columns of two rows, accumulated in vector registers over k (each load
     * of ``right`` serves both rows); the sum's order per element is the same in every branch */
    const Py_ssize_t blocked = cols - cols % LORA_COLS;
    Py_ssize_t i = 0;
    for (; i + 2 <= rows; i += 2) {
        const float *l0 = left + i * rank, *l1 = l0 + rank;
        float *restrict o0 = out + i * cols, *restrict o1 = o0 + cols;
        for (Py_ssize_t j0 = 0; j0 < blocked; j0 += LORA_COLS) {
            v8f a0[4], a1[4];
            const float *r = right + j0;
            const v8f x0 = {l0[0], l0[0], l0[0], l0[0], l0[0], l0[0], l0[0], l0[0]};
            const v8f x1 = {l1[0], l1[0], l1[0], l1[0], l1[0], l1[0], l1[0], l1[0]};
            for (int q = 0; q < 4; q++) {
                v8f rv;
                memcpy(&rv, r + 8 * q, sizeof(rv));
                a0[q] = x0 * rv;
                a1[q] = x1 * rv;
            }
            for (Py_ssize_t k = 1; k < rank; k++) {
                const float *rk = right + k * cols + j0;
                const float s0 = l0[k], s1 = l1[k];
                const v8f y0 = {s0, s0, s0, s0, s0, s0, s0, s0}, y1 = {s1, s1, s1, s1, s1, s1, s1, s1};
                for (int q = 0; q < 4; q++) {
                    v8f rv;
                    memcpy(&rv, rk + 8 * q, sizeof(rv));
                    a0[q] = a0[q] + y0 * rv;
                    a1[q] = a1[q] + y1 * rv;
                }
            }
            memcpy(o0 + j0, a0, sizeof(a0));
            memcpy(o1 + j0, a1, sizeof(a1));
        }
        lora_row_tail(l0, right, rank, cols, blocked, cols, o0);
        lora_row_tail(l1, right, rank, cols, blocked, cols, o1);
    }
    for (; i < rows; i++)
        lora_row_tail(left + i * rank, right, rank, cols, 0, cols, out + i * cols);
    if (post_scale != 1.0f)
        for (Py_ssize_t n = 0; n < rows * cols; n++)
            out[n] = out[n] * post_scale;
}

/* lora_rows(left, right, rows, rank, cols, out, post_scale) -> None (see lora_rows_body) */
static PyObject *lora_rows(PyObject *self, PyObject *args) {
    Py_buffer left, right, out;
    Py_ssize_t rows, rank, cols;
    float post_scale;
    if (!PyArg_ParseTuple(args, "y*y*nnnw*f", &left, &right, &rows, &rank, &cols, &out, &post_scale))
        return NULL;
    PyObject *result = NULL;
    if (rows < 0 || rank < 1 || cols < 0 || left.len < rows * rank * 4 || right.len < rank * cols * 4 ||
        out.len < rows * cols * 4) {
        PyErr_SetString(PyExc_ValueError, "lora_rows: buffers too small for rows x rank x cols");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    lora_rows_body((const float *)left.buf, (const float *)right.buf, rows, rank, cols, (float *)out.buf, post_scale);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&left);
    PyBuffer_Release(&right);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"lora_rows", lora_rows, METH_VARARGS, "Rows of a LoRA product left @ right in float32 (see the C source)."},
    {"band_count", band_count, METH_VARARGS, "Count |h - b| bit patterns against a band (see the C source)."},
    {"band_collect", band_collect, METH_VARARGS, "band_count that also records in-band values (see the C source)."},
    {"apply", apply, METH_VARARGS, "t - scale * shrink(h - b), rounded to the output kind (see the C source)."},
    {"xxh64_update", py_xxh64_update, METH_VARARGS, "Feed bytes to an XXH64 state; no bytes: reset it."},
    {"xxh64_digest", py_xxh64_digest, METH_VARARGS, "The XXH64 of the bytes fed to a state."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "Fused HDR chunk loops.", -1, methods};

PyMODINIT_FUNC PyInit__fused(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "XXH64_STATE", (long)sizeof(xxh_state)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
