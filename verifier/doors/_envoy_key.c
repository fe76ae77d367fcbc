/*
 * The Envoy door's key (verifier/doors/envoy_request.py), in C: a serialized envoy.service.auth.v3.CheckRequest
 * copied as it is but for what Envoy fills anew for every request, which is left out:
 *
 *   CheckRequest.attributes (1) -> AttributeContext.request (4) -> Request.time (1)        left out
 *                                                              -> Request.http (2) -> HttpRequest.id (1)    left out
 *                                                                                  -> HttpRequest.headers (3)
 *                                                                                       an entry that is exactly
 *                                                                                       Envoy's x-request-id one: left out
 *                                                                                  -> HttpRequest.header_map (13)
 *                                                                                       -> HeaderMap.headers (1) idem
 *
 * Every other field, known or not, is copied byte for byte in the order it came; the five messages on the way are
 * copied field by field with their lengths written anew. The result is a serialization of Envoy's message without
 * those fields, which the door parses and translates itself (so equal keys are one message). Anything this walk does
 * not take as a well-formed message at those five levels (a group, a varint or length running past the end, a
 * field number 0, a tag or length over 5 bytes) gives None: the pure-Python key decides (and refuses what is not a
 * CheckRequest). So does a request with both header forms (HttpRequest.headers and .header_map, in any of the
 * HttpRequest messages it holds: the parser merges them): Envoy never sends both, and the door refuses both only if
 * it sees both, so their x-request-id entry is not left out (the Python key keeps it too); left out, a `headers`
 * holding only it was an empty map beside header_map, one form.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define CHECK_REQUEST 0
#define ATTRIBUTE_CONTEXT 1
#define REQUEST 2
#define HTTP_REQUEST 3
#define HEADER_MAP 4

/* The header forms seen anywhere in the walk (`copy`'s `forms`). */
#define HEADERS_SEEN 1
#define HEADER_MAP_SEEN 2
#define BOTH_FORMS (HEADERS_SEEN | HEADER_MAP_SEEN)

static const unsigned char REQUEST_ID[] = "\n\x0cx-request-id"; /* field 1, 12 bytes: the name */
#define REQUEST_ID_LEN 14

/*
 * Reads a varint of at most `max` bytes (10: a value; 5: a tag or a length, as protobuf's parsers take them, which
 * refuse longer ones even where the value is small) at *p (below end) into *value; 0 when it runs past the end or
 * past `max` bytes.
 */
static int read_varint(const unsigned char **p, const unsigned char *end, unsigned long long *value, int max) {
    unsigned long long v = 0;
    int shift = 0;
    while (*p < end && shift < 7 * max) { /* shift <= 63 */
        unsigned char b = *(*p)++;
        v |= (unsigned long long)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *value = v;
            return 1;
        }
        shift += 7;
    }
    return 0;
}

static size_t varint_size(unsigned long long v) {
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static unsigned char *write_varint(unsigned char *out, unsigned long long v) {
    while (v >= 0x80) {
        *out++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *out++ = (unsigned char)v;
    return out;
}

/* Envoy's x-request-id entry, exactly: the name, then a value (2) or raw value (3) of one-byte length, nothing else. */
static int is_request_id(const unsigned char *p, size_t n) {
    return n >= REQUEST_ID_LEN + 2 && memcmp(p, REQUEST_ID, REQUEST_ID_LEN) == 0 &&
           (p[REQUEST_ID_LEN] == 0x12 || p[REQUEST_ID_LEN] == 0x1A) && p[REQUEST_ID_LEN + 1] < 0x80 &&
           n == (size_t)REQUEST_ID_LEN + 2 + p[REQUEST_ID_LEN + 1];
}

/* The level of the message field `number` (wire type LEN) of a message at `level`, -1: copied as it is, -2: left out. */
static int nested(int level, unsigned long long number, const unsigned char *p, size_t n) {
    switch (level) {
    case CHECK_REQUEST:
        return number == 1 ? ATTRIBUTE_CONTEXT : -1;
    case ATTRIBUTE_CONTEXT:
        return number == 4 ? REQUEST : -1;
    case REQUEST:
        return number == 2 ? HTTP_REQUEST : -1;
    case HTTP_REQUEST:
        if (number == 3)
            return is_request_id(p, n) ? -2 : -1;
        return number == 13 ? HEADER_MAP : -1;
    case HEADER_MAP:
        return number == 1 && is_request_id(p, n) ? -2 : -1;
    }
    return -1;
}

/*
 * Copies the message in [p, end) at `level` to `out` (NULL: only counts); returns the bytes written, or -1 when the
 * walk does not take it as a message. Adds to *forms the header forms an HttpRequest holds.
 */
static Py_ssize_t copy(int level, const unsigned char *p, const unsigned char *end, unsigned char *out, int *forms) {
    Py_ssize_t written = 0;
    while (p < end) {
        const unsigned char *field = p;
        unsigned long long tag, value;
        if (!read_varint(&p, end, &tag, 5) || tag > 0xFFFFFFFFULL || (tag >> 3) == 0)
            return -1;
        unsigned long long number = tag >> 3;
        int wire = (int)(tag & 7);
        const unsigned char *body = p;
        switch (wire) {
        case 0:
            if (!read_varint(&p, end, &value, 10))
                return -1;
            break;
        case 1:
            if (end - p < 8)
                return -1;
            p += 8;
            break;
        case 5:
            if (end - p < 4)
                return -1;
            p += 4;
            break;
        case 2:
            if (!read_varint(&p, end, &value, 5) || value > (unsigned long long)(end - p))
                return -1;
            body = p;
            p += value;
            break;
        default: /* groups (3, 4), 6, 7 */
            return -1;
        }
        if ((level == REQUEST || level == HTTP_REQUEST) && number == 1)
            continue; /* Request.time, HttpRequest.id: per request */
        if (level == HTTP_REQUEST && (number == 3 || number == 13))
            *forms |= number == 3 ? HEADERS_SEEN : HEADER_MAP_SEEN;
        int inner = wire == 2 ? nested(level, number, body, (size_t)(p - body)) : -1;
        if (inner == -2)
            continue; /* Envoy's x-request-id entry */
        if (inner < 0) {
            if (out != NULL)
                memcpy(out + written, field, (size_t)(p - field));
            written += p - field;
            continue;
        }
        Py_ssize_t size = copy(inner, body, p, NULL, forms);
        if (size < 0)
            return -1;
        size_t tag_size = varint_size(tag);
        if (out != NULL) {
            unsigned char *w = write_varint(out + written, tag);
            w = write_varint(w, (unsigned long long)size);
            if (copy(inner, body, p, w, forms) != size)
                return -1;
        }
        written += (Py_ssize_t)(tag_size + varint_size((unsigned long long)size)) + size;
    }
    return written;
}

static PyObject *key(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "key() takes bytes");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(arg);
    const unsigned char *end = data + PyBytes_GET_SIZE(arg);
    int forms = 0;
    Py_ssize_t size = copy(CHECK_REQUEST, data, end, NULL, &forms);
    if (size < 0 || forms == BOTH_FORMS)
        Py_RETURN_NONE; /* not a message here, or both header forms: the Python key */
    PyObject *result = PyBytes_FromStringAndSize(NULL, size);
    if (result == NULL)
        return NULL;
    if (copy(CHECK_REQUEST, data, end, (unsigned char *)PyBytes_AS_STRING(result), &forms) != size) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_RuntimeError, "envoy key: the two passes disagree");
        return NULL;
    }
    return result;
}

static PyMethodDef methods[] = {
    {"key", key, METH_O,
     "key(data: bytes) -> bytes | None: a serialized Envoy CheckRequest without its per-request fields; None when "
     "the bytes are not a message at the levels walked, or hold both header forms."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_envoy_key",
    .m_doc = "The Envoy door's key, in C (verifier/doors/envoy_request.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__envoy_key(void) { return PyModule_Create(&module_def); }
