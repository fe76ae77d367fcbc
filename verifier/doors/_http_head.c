/*
 * The forward-auth door's parse of one whole, bodyless HTTP/1.1 request, in C (verifier/doors/forward_auth.py,
 * `_Connection._received_at_boundary`): what llhttp and the door's callbacks make of such a request, in one call.
 *
 *   head(data, max_headers) -> (method, target, headers) | None
 *
 * It takes only a strict subset of what llhttp takes, and anything outside it gives None: the door then parses the
 * bytes with llhttp (httptools) as before, which answers or refuses them. The subset, all of it in `data`:
 *
 *   request-line  = method SP target SP "HTTP/1.1" CRLF       one SP each; the methods below; the target in
 *                                                             origin-form ("/" first), its bytes 0x21-0x7E
 *   header-field  = name ":" *(SP / HTAB) value CRLF          name: RFC 9110 tchars; value: HTAB, SP, 0x21-0x7E,
 *                                                             0x80-0xFF, not ending in SP or HTAB (llhttp keeps
 *                                                             trailing white space in a value: not worth copying)
 *   then CRLF, which is the last byte of `data`: one request, no body, nothing after it.
 *
 * And: no name twice (any case), at most `max_headers` fields; no Transfer-Encoding, no Upgrade; Content-Length only
 * as "0"; Connection, and Proxy-Connection (which llhttp reads as Connection: "close" closes), only as "keep-alive"
 * (any case). So the request keeps its connection open, has no body, and the door's llhttp parser, never fed it,
 * stays at the start of a message for the next one.
 *
 * What it gives is what the callbacks build: the method and the target as bytes (llhttp's `get_method()` and
 * `on_url`), the fields as a dict of the name in lower case to the value decoded as Latin-1 (`on_headers_complete`).
 * tests/doors/test_http_head.py compares the two on generated and mutated requests, and an atheris target does too.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* RFC 9110 section 5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|"
 * / "~" / DIGIT / ALPHA */
static int is_tchar(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static int is_value_char(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7F); }

static const char *const METHODS[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", NULL};

static int known_method(const unsigned char *p, Py_ssize_t n) {
    for (int i = 0; METHODS[i] != NULL; i++) {
        if ((Py_ssize_t)strlen(METHODS[i]) == n && memcmp(METHODS[i], p, (size_t)n) == 0)
            return 1;
    }
    return 0;
}

/* Whether the `n` bytes at p, lower-cased, are `lower` (ASCII). */
static int equals_lower(const unsigned char *p, Py_ssize_t n, const char *lower) {
    Py_ssize_t len = (Py_ssize_t)strlen(lower);
    if (n != len)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c + 32);
        if (c != (unsigned char)lower[i])
            return 0;
    }
    return 1;
}

/* A field name (tchars, so ASCII) as lower-case text. */
static PyObject *lower_name(const unsigned char *p, Py_ssize_t n) {
    PyObject *name = PyUnicode_New(n, 127);
    if (name == NULL)
        return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(name);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        out[i] = (Py_UCS1)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    return name;
}

/* The fields from `p` (just after the request line) to `end`; NULL with no error set: not in the subset. */
static PyObject *fields(const unsigned char *p, const unsigned char *end, Py_ssize_t max_headers) {
    PyObject *headers = PyDict_New();
    if (headers == NULL)
        return NULL;
    Py_ssize_t count = 0;
    for (;;) {
        if (end - p < 2)
            goto outside;
        if (p[0] == '\r') { /* the empty line: the end of the head, which must be the end of `data` */
            if (p[1] != '\n' || p + 2 != end)
                goto outside;
            return headers;
        }
        const unsigned char *name = p;
        while (p < end && is_tchar(*p))
            p++;
        if (p == name || p >= end || *p != ':')
            goto outside;
        Py_ssize_t name_len = p - name;
        p++;
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        const unsigned char *value = p;
        while (p < end && *p != '\r') {
            if (!is_value_char(*p))
                goto outside;
            p++;
        }
        if (end - p < 2 || p[1] != '\n')
            goto outside;
        Py_ssize_t value_len = p - value;
        p += 2;
        if (value_len && (value[value_len - 1] == ' ' || value[value_len - 1] == '\t'))
            goto outside;
        if (++count > max_headers)
            goto outside;
        if (equals_lower(name, name_len, "transfer-encoding") || equals_lower(name, name_len, "upgrade"))
            goto outside;
        if (equals_lower(name, name_len, "content-length") && !(value_len == 1 && value[0] == '0'))
            goto outside;
        /* llhttp reads Proxy-Connection as it reads Connection ("close" closes): the same rule for both */
        if ((equals_lower(name, name_len, "connection") || equals_lower(name, name_len, "proxy-connection")) &&
            !equals_lower(value, value_len, "keep-alive"))
            goto outside;
        PyObject *key = lower_name(name, name_len);
        if (key == NULL)
            goto error;
        int there = PyDict_Contains(headers, key);
        if (there != 0) { /* a name twice: the door joins them (RFC 9110 section 5.3) on its own path */
            Py_DECREF(key);
            if (there < 0)
                goto error;
            goto outside;
        }
        PyObject *text = PyUnicode_DecodeLatin1((const char *)value, value_len, NULL);
        if (text == NULL) {
            Py_DECREF(key);
            goto error;
        }
        int failed = PyDict_SetItem(headers, key, text);
        Py_DECREF(key);
        Py_DECREF(text);
        if (failed)
            goto error;
    }
outside:
    Py_DECREF(headers);
    return NULL;
error:
    Py_DECREF(headers);
    return NULL;
}

static PyObject *head(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "head() takes (data: bytes, max_headers: int)");
        return NULL;
    }
    Py_ssize_t max_headers = PyLong_AsSsize_t(args[1]);
    if (max_headers == -1 && PyErr_Occurred())
        return NULL;
    if (max_headers < 0) { /* no bound to keep: a request is not answered here (was: one without fields was) */
        PyErr_SetString(PyExc_ValueError, "head() takes max_headers >= 0");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    const unsigned char *end = data + PyBytes_GET_SIZE(args[0]);
    const unsigned char *p = data;
    while (p < end && *p >= 'A' && *p <= 'Z')
        p++;
    if (p >= end || *p != ' ' || !known_method(data, p - data))
        Py_RETURN_NONE;
    const unsigned char *method_end = p++;
    const unsigned char *target = p;
    if (p >= end || *p != '/') /* origin-form (RFC 9112 section 3.2.1) only: llhttp reads the others its own ways */
        Py_RETURN_NONE;
    while (p < end && *p >= 0x21 && *p <= 0x7E)
        p++;
    if (end - p < 11 || memcmp(p, " HTTP/1.1\r\n", 11) != 0)
        Py_RETURN_NONE;
    const unsigned char *target_end = p;
    PyObject *headers = fields(p + 11, end, max_headers);
    if (headers == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *method = PyBytes_FromStringAndSize((const char *)data, method_end - data);
    PyObject *url = PyBytes_FromStringAndSize((const char *)target, target_end - target);
    if (method == NULL || url == NULL) {
        Py_XDECREF(method);
        Py_XDECREF(url);
        Py_DECREF(headers);
        return NULL;
    }
    PyObject *result = PyTuple_New(3);
    if (result == NULL) {
        Py_DECREF(method);
        Py_DECREF(url);
        Py_DECREF(headers);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, method);
    PyTuple_SET_ITEM(result, 1, url);
    PyTuple_SET_ITEM(result, 2, headers);
    return result;
}

static PyMethodDef methods[] = {
    {"head", (PyCFunction)(void (*)(void))head, METH_FASTCALL,
     "head(data: bytes, max_headers: int) -> tuple[bytes, bytes, dict[str, str]] | None: one whole bodyless "
     "keep-alive HTTP/1.1 request's method, target and fields; None when the bytes are not in the subset taken."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_http_head",
    .m_doc = "The forward-auth door's parse of a whole bodyless request, in C (verifier/doors/forward_auth.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__http_head(void) { return PyModule_Create(&module_def); }
