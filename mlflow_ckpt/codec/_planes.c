/* Byte planes for compressed checkpoints: split elements into planes and merge them back.
 *
 * Why native code: regrouping bytes is a byte shuffle, and NumPy and torch have no
 * vectorised kernel for one. Their strided copies move one byte per step (3.7-3.9 GB/s on
 * one core here); with SSE2 unpacks (every x86-64 CPU has them) the same merge runs at
 * memory speed, which is what keeps loading a compressed checkpoint close to loading a
 * plain one. Built as an optional extension: without a C compiler the package falls back
 * to NumPy (mlflow_ckpt/codec/planes.py), with the same bytes either way.
 *
 * merge(out, planes): out[k * i + j] = planes[j][i]     (k planes of n bytes, out k * n)
 * split(data, planes): planes[j][i] = data[k * i + j]   (the inverse)
 *
 * Both release the GIL: the decoder's threads merge blocks side by side.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#if defined(__SSE2__) || defined(_M_X64) /* (MSVC defines no __SSE2__ on x64) */
#define HAVE_SSE2 1
#include <emmintrin.h>
#endif

#define MAX_PLANES 8

#if defined(HAVE_SSE2)
#define LOAD(p) _mm_loadu_si128((const __m128i *)(p))
#define STORE(p, v) _mm_storeu_si128((__m128i *)(p), (v))

/* 16 elements per step: 2, 4 or 8 planes interleaved by rounds of unpacks (bytes, then
 * 16-bit pairs, then 32-bit quads). */
static size_t merge_sse2(uint8_t *out, const uint8_t *const *p, int k, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint8_t *o = out + (size_t)k * i;
        if (k == 2) {
            __m128i a = LOAD(p[0] + i), b = LOAD(p[1] + i);
            STORE(o, _mm_unpacklo_epi8(a, b));
            STORE(o + 16, _mm_unpackhi_epi8(a, b));
        } else if (k == 4) {
            __m128i a = LOAD(p[0] + i), b = LOAD(p[1] + i), c = LOAD(p[2] + i),
                    d = LOAD(p[3] + i);
            __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
            __m128i cd0 = _mm_unpacklo_epi8(c, d), cd1 = _mm_unpackhi_epi8(c, d);
            STORE(o, _mm_unpacklo_epi16(ab0, cd0));
            STORE(o + 16, _mm_unpackhi_epi16(ab0, cd0));
            STORE(o + 32, _mm_unpacklo_epi16(ab1, cd1));
            STORE(o + 48, _mm_unpackhi_epi16(ab1, cd1));
        } else { /* k == 8 */
            __m128i v[8], w[8], x[8];
            for (int j = 0; j < 8; j++) v[j] = LOAD(p[j] + i);
            for (int j = 0; j < 4; j++) { /* byte pairs (2j, 2j+1): elements 0-7, 8-15 */
                w[2 * j] = _mm_unpacklo_epi8(v[2 * j], v[2 * j + 1]);
                w[2 * j + 1] = _mm_unpackhi_epi8(v[2 * j], v[2 * j + 1]);
            }
            for (int h = 0; h < 2; h++) { /* bytes 0-3 and 4-7; elements 0-3 .. 12-15 */
                const __m128i *lo = &w[4 * h], *hi = &w[4 * h + 2];
                x[4 * h] = _mm_unpacklo_epi16(lo[0], hi[0]);
                x[4 * h + 1] = _mm_unpackhi_epi16(lo[0], hi[0]);
                x[4 * h + 2] = _mm_unpacklo_epi16(lo[1], hi[1]);
                x[4 * h + 3] = _mm_unpackhi_epi16(lo[1], hi[1]);
            }
            for (int q = 0; q < 4; q++) { /* elements 4q .. 4q+3 */
                STORE(o + 32 * q, _mm_unpacklo_epi32(x[q], x[4 + q]));
                STORE(o + 32 * q + 16, _mm_unpackhi_epi32(x[q], x[4 + q]));
            }
        }
    }
    return i;
}

/* The even and odd bytes of 32 bytes, each as 16 bytes. */
static inline void evens_odds(__m128i a, __m128i b, __m128i *even, __m128i *odd) {
    const __m128i low = _mm_set1_epi16(0x00FF);
    *even = _mm_packus_epi16(_mm_and_si128(a, low), _mm_and_si128(b, low));
    *odd = _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8));
}

/* 16 elements per step: 2, 4 or 8 planes, by halving into even and odd bytes (each round
 * halves the element size: 8 bytes -> 4 + 4 -> 2 + 2 + 2 + 2 -> planes). */
static size_t split_sse2(const uint8_t *data, uint8_t *const *p, int k, size_t n) {
    size_t i = 0;
    if (k != 2 && k != 4 && k != 8) return 0;
    for (; i + 16 <= n; i += 16) {
        const uint8_t *d = data + (size_t)k * i;
        __m128i a, b;
        if (k == 2) {
            evens_odds(LOAD(d), LOAD(d + 16), &a, &b);
            STORE(p[0] + i, a);
            STORE(p[1] + i, b);
        } else if (k == 4) {
            __m128i e0, o0, e1, o1;
            evens_odds(LOAD(d), LOAD(d + 16), &e0, &o0);      /* bytes 0,2 / 1,3: elements 0-7 */
            evens_odds(LOAD(d + 32), LOAD(d + 48), &e1, &o1); /* elements 8-15 */
            evens_odds(e0, e1, &a, &b);
            STORE(p[0] + i, a);
            STORE(p[2] + i, b);
            evens_odds(o0, o1, &a, &b);
            STORE(p[1] + i, a);
            STORE(p[3] + i, b);
        } else { /* k == 8 */
            __m128i e[4], o[4], h[8];
            for (int j = 0; j < 4; j++) /* bytes 0,2,4,6 / 1,3,5,7 of elements 4j .. 4j+3 */
                evens_odds(LOAD(d + 32 * j), LOAD(d + 32 * j + 16), &e[j], &o[j]);
            /* h: bytes (0,4) (2,6) (1,5) (3,7), of elements 0-7 then 8-15 */
            evens_odds(e[0], e[1], &h[0], &h[1]);
            evens_odds(e[2], e[3], &h[4], &h[5]);
            evens_odds(o[0], o[1], &h[2], &h[3]);
            evens_odds(o[2], o[3], &h[6], &h[7]);
            static const int lower[4] = {0, 2, 1, 3}; /* the plane of each pair's first byte */
            for (int q = 0; q < 4; q++) {
                evens_odds(h[q], h[4 + q], &a, &b);
                STORE(p[lower[q]] + i, a);
                STORE(p[lower[q] + 4] + i, b);
            }
        }
    }
    return i;
}
#else /* no SSE2 (ARM, ...): the loops below do it all */
static size_t merge_sse2(uint8_t *out, const uint8_t *const *p, int k, size_t n) {
    (void)out, (void)p, (void)k, (void)n;
    return 0;
}
static size_t split_sse2(const uint8_t *data, uint8_t *const *p, int k, size_t n) {
    (void)data, (void)p, (void)k, (void)n;
    return 0;
}
#endif

static void merge_rest(uint8_t *out, const uint8_t *const *p, int k, size_t from, size_t n) {
    for (size_t i = from; i < n; i++)
        for (int j = 0; j < k; j++) out[(size_t)k * i + j] = p[j][i];
}

static void split_rest(const uint8_t *data, uint8_t *const *p, int k, size_t from, size_t n) {
    for (size_t i = from; i < n; i++)
        for (int j = 0; j < k; j++) p[j][i] = data[(size_t)k * i + j];
}

/* Parse (whole, planes): the whole buffer and k plane buffers of equal length, whole = k x
 * plane. ``planes_writable`` picks which side is written. */
static int views_of(PyObject *whole, PyObject *seq, int planes_writable, Py_buffer *all,
                    Py_buffer *views, Py_ssize_t *k) {
    int flags = PyBUF_SIMPLE | (planes_writable ? PyBUF_WRITABLE : 0);
    PyObject *fast = PySequence_Fast(seq, "planes must be a sequence of buffers");
    if (!fast) return -1;
    *k = PySequence_Fast_GET_SIZE(fast);
    if (*k < 1 || *k > MAX_PLANES) {
        PyErr_Format(PyExc_ValueError, "1 to %d planes, not %zd", MAX_PLANES, *k);
        Py_DECREF(fast);
        return -1;
    }
    if (PyObject_GetBuffer(whole, all, planes_writable ? PyBUF_SIMPLE : PyBUF_SIMPLE | PyBUF_WRITABLE) < 0) {
        Py_DECREF(fast);
        return -1;
    }
    Py_ssize_t got = 0;
    for (; got < *k; got++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &views[got], flags) < 0) break;
    Py_DECREF(fast);
    if (got == *k) {
        for (Py_ssize_t j = 1; j < *k && got == *k; j++)
            if (views[j].len != views[0].len) got = -1;
        if (got == *k && all->len == views[0].len * *k) return 0;
        PyErr_SetString(PyExc_ValueError, "planes must be of one length and fill the whole buffer");
        got = *k;
    }
    for (Py_ssize_t j = 0; j < got; j++) PyBuffer_Release(&views[j]);
    PyBuffer_Release(all);
    return -1;
}

static void release(Py_buffer *all, Py_buffer *views, Py_ssize_t k) {
    for (Py_ssize_t j = 0; j < k; j++) PyBuffer_Release(&views[j]);
    PyBuffer_Release(all);
}

/* The kernels behind one signature: ``whole`` is written by merge, read by split. */
typedef void (*kernel_fn)(uint8_t *whole, uint8_t *const *planes, int k, size_t n);

static void merge_all(uint8_t *out, uint8_t *const *planes, int k, size_t n) {
    const uint8_t *const *p = (const uint8_t *const *)planes;
    size_t done = (k == 2 || k == 4 || k == 8) ? merge_sse2(out, p, k, n) : 0;
    merge_rest(out, p, k, done, n);
}

static void split_all(uint8_t *data, uint8_t *const *planes, int k, size_t n) {
    split_rest(data, planes, k, split_sse2(data, planes, k, n), n);
}

static PyObject *run(PyObject *args, const char *format, int planes_writable, kernel_fn fn) {
    PyObject *whole, *seq;
    Py_buffer all, views[MAX_PLANES];
    uint8_t *p[MAX_PLANES];
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, format, &whole, &seq)) return NULL;
    if (views_of(whole, seq, planes_writable, &all, views, &k) < 0) return NULL;
    for (Py_ssize_t j = 0; j < k; j++) p[j] = views[j].buf;
    size_t n = (size_t)views[0].len;
    Py_BEGIN_ALLOW_THREADS
    fn(all.buf, p, (int)k, n);
    Py_END_ALLOW_THREADS
    release(&all, views, k);
    Py_RETURN_NONE;
}

static PyObject *merge(PyObject *self, PyObject *args) {
    (void)self;
    return run(args, "OO:merge", 0, merge_all);
}

static PyObject *split(PyObject *self, PyObject *args) {
    (void)self;
    return run(args, "OO:split", 1, split_all);
}

static PyMethodDef methods[] = {
    {"merge", merge, METH_VARARGS, "merge(out, planes): interleave k byte planes into out."},
    {"split", split, METH_VARARGS, "split(data, planes): the inverse of merge."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_planes", "Byte planes (SSE2 where the CPU has it).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
