/* openloop: an open-loop load generator for the bench (HTTP/1.1 and gRPC over HTTP/2).
 *
 * Every request has an INTENDED send time on a fixed schedule (constant or Poisson inter-send times, one
 * global schedule spread over N keep-alive connections); latency is measured from that intended time with
 * CLOCK_MONOTONIC, so a server stall charges every request that should have been sent during it
 * (coordinated omission corrected). A request that is due while every connection is busy waits in a FIFO
 * backlog (HTTP/1.1: one request in flight per connection; gRPC: streams multiplex, up to the peer's
 * concurrent-stream limit, at most --max-streams, default 100: an overloaded grpc-python server answered
 * CANCELLED to a third of the calls with 1,000 in flight per connection); that wait is part of its latency.
 *
 * Connections (gRPC): fixed, --connections N held to their streams and the rest queued, as one grpc C-core
 * channel per connection does; or, with --pool-max M, a pool as Envoy's HTTP/2 connection pool keeps one: it
 * starts with the N connections and opens another when requests wait and the connections still connecting
 * cannot take them (their expected streams: the last peer limit seen), up to M in all. A connection of the pool
 * takes requests once the peer's SETTINGS arrived (its stream limit is known). "connections_opened" reports how
 * many it had. A server without a stream bound (100 here) leaves the pool at N: the two models are the same.
 *
 * The generator's own lag is reported apart: lag = actual send - the moment it could have been sent
 * (its intended time, or later when it had to wait for a free connection). On an idle core the timer
 * (epoll_pwait2's nanosecond timeout, 1 ns timer slack, ending early by the learned wake-up latency and
 * polling the rest, see turn()) keeps it within microseconds.
 *
 * Single thread, epoll. Bad input is counted, never fatal: connection refused (connect errors, retried),
 * a server close with a request in flight (closed), a malformed or oversized response (malformed), an
 * HTTP/2 stream reset (reset). Requests of the measured window not answered by the drain deadline are
 * counted as dropped and recorded at the deadline (a lower bound). A per-run alarm ends a stuck process.
 *
 * Output: one JSON line (counts, percentiles in us, histogram buckets in us for the bench to rebuild its
 * HdrHistograms). With --go-stdin it prints "ready" once connected and starts at the CLOCK_MONOTONIC
 * second given by a "go <seconds>" line (the bench's time.perf_counter clock).
 *
 * Build: gcc -O2 -o openloop openloop.c -lnghttp2 -lm
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

typedef int64_t ns_t;
#define NS 1000000000LL
#define MAX_RESPONSE (16 << 20)   /* a response larger than this is malformed */
#define MAX_BODY_KEPT 65536       /* gRPC answer bytes kept for the allow rule */
#define CONNECT_RETRY_NS (10 * 1000000LL)
#define CLOSE_RETRY_NS (1 * 1000000LL)

static ns_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (ns_t)ts.tv_sec * NS + ts.tv_nsec;
}

/* --- histogram: log-linear buckets, 1/1024 relative precision, values in ns ---------------------- */

#define SUB 2048
#define HALF 1024
#define NBUCKETS (SUB + 48 * HALF)

typedef struct {
    uint64_t c[NBUCKETS];
    uint64_t n;
    ns_t max;
    double sum;
} hist_t;

static int h_index(ns_t v) {
    if (v < SUB) return (int)v;
    int shift = (63 - __builtin_clzll((uint64_t)v)) - 10;
    return SUB + (shift - 1) * HALF + (int)((v >> shift) - HALF);
}

static ns_t h_low(int i) {
    if (i < SUB) return i;
    int k = i - SUB, shift = k / HALF + 1;
    return (ns_t)((k % HALF) + HALF) << shift;
}

static ns_t h_high(int i) {
    if (i < SUB) return i;
    int shift = (i - SUB) / HALF + 1;
    return h_low(i) + ((ns_t)1 << shift) - 1;
}

static void h_record(hist_t *h, ns_t v) {
    if (v < 1) v = 1;
    if (v > ((ns_t)1 << 46)) v = (ns_t)1 << 46;
    h->c[h_index(v)]++;
    h->n++;
    h->sum += (double)v;
    if (v > h->max) h->max = v;
}

static ns_t h_percentile(const hist_t *h, double p) {
    if (!h->n) return 0;
    if (p >= 100.0) return h->max;
    uint64_t want = (uint64_t)ceil(p / 100.0 * (double)h->n), seen = 0;
    if (want < 1) want = 1;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += h->c[i];
        if (seen >= want) return h_high(i) < h->max ? h_high(i) : h->max;
    }
    return h->max;
}

/* --- options and state ----------------------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len;
} buf_t;

enum { MODE_HTTP, MODE_GRPC };
enum { ERR_CONNECT, ERR_CLOSED, ERR_MALFORMED, ERR_RESET, N_ERR };
static const char *ERR_NAMES[N_ERR] = {"connect", "closed", "malformed", "reset"};

static struct {
    int mode;
    char host[256], port[16];
    double rate, duration, warmup, drain;
    int connections, poisson, go_stdin, spin_us, max_lead_us, max_streams, pool_max;
    unsigned seed;
    const char *payloads, *raw, *path, *authority, *grpc_timeout, *allow;
    int allow_path[8], allow_depth;
    uint64_t allow_value;
} opt = {.rate = 100, .duration = 1, .drain = 2, .connections = 8, .seed = 1, .max_streams = 100,
         .path = "/", .spin_us = 0, .max_lead_us = 50};

static buf_t *payloads;
static size_t n_payloads, next_payload, reused;
static ns_t *sched;               /* intended send times (absolute, CLOCK_MONOTONIC ns) */
static size_t n_sched, due, dispatched;
static ns_t win_start, win_end, deadline;
static hist_t latency, service, lag, wait_hist;
static uint64_t http_status[600], grpc_status[19]; /* [17]: no grpc-status, [18]: not a code */
static uint64_t completed, allowed, denied, errors[N_ERR], dropped, sent_in_window, connect_failures, disconnects;
static uint64_t unsolicited; /* connections dropped for bytes no request asked for */
static int epfd;

typedef struct req {
    ns_t intended, ready, sent;
    int in_window;
    struct conn *conn;
    struct req *prev, *next;          /* the connection's in-flight list (gRPC) */
    const buf_t *payload;
    size_t off;
    int http_status, grpc_status;     /* -1 unseen */
    char *body;
    size_t body_len;
} req_t;

typedef struct conn {
    int id, fd, state;               /* 0 down, 1 connecting, 2 up */
    ns_t retry_at, avail_at;
    int answered;                    /* responses on this connection since it connected */
    int settings;                    /* HTTP/2: the peer's SETTINGS arrived (its stream limit is known) */
    /* HTTP/1.1 */
    req_t *cur;
    size_t out_off;
    char *in;
    size_t in_len, in_cap;
    /* HTTP/2 */
    nghttp2_session *h2;
    uint8_t *h2out;                  /* frames gathered for one send() */
    size_t h2out_len, h2out_off, h2out_cap;
    req_t *inflight;
    int n_inflight;
    uint32_t events;
} conn_t;

static conn_t *conns;
static int n_conns;               /* connections in use: --connections, more in pool mode (--pool-max) */
static int last_limit;            /* the last peer stream limit seen: a connecting one's expected streams */
static struct addrinfo *addr;

static void die(const char *msg) {
    fprintf(stderr, "openloop: %s\n", msg);
    exit(2);
}

/* --- outcomes -------------------------------------------------------------------------------------- */

static void on_sent(req_t *r) {
    if (!r->in_window) return;
    sent_in_window++;
    h_record(&lag, r->sent - r->ready);
    h_record(&wait_hist, r->sent - r->intended);
}

static void on_answer(req_t *r, ns_t t) {
    if (!r->in_window) return;
    completed++;
    h_record(&latency, t - r->intended);
    h_record(&service, t - r->sent);
}

static void on_error(req_t *r, int kind) {
    if (r->in_window) errors[kind]++;
}

/* --- protobuf: the allow rule ("1=1": top-level varint field 1 is 1; "1.1=0": field 1 of message field 1) */

static int pb_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    *v = 0;
    for (int s = 0; s < 64; s += 7) {
        if (*p >= end) return -1;
        uint8_t b = *(*p)++;
        *v |= (uint64_t)(b & 0x7f) << s;
        if (!(b & 0x80)) return 0;
    }
    return -1;
}

/* The value at path[0..depth) (0 when absent, proto3's default), or -1 when the message is malformed. */
static int pb_get(const uint8_t *p, const uint8_t *end, const int *path, int depth, uint64_t *out) {
    *out = 0;
    while (p < end) {
        uint64_t key, v;
        if (pb_varint(&p, end, &key)) return -1;
        uint64_t field = key >> 3;
        int wt = (int)(key & 7);
        if (wt == 0) {
            if (pb_varint(&p, end, &v)) return -1;
            if (field == (uint64_t)path[0] && depth == 1) *out = v;
        } else if (wt == 2) {
            if (pb_varint(&p, end, &v) || v > (uint64_t)(end - p)) return -1;
            if (field == (uint64_t)path[0] && depth > 1 && pb_get(p, p + v, path + 1, depth - 1, out)) return -1;
            p += v;
        } else if (wt == 1 || wt == 5) {
            size_t n = wt == 1 ? 8 : 4;
            if ((size_t)(end - p) < n) return -1;
            p += n;
        } else {
            return -1;
        }
    }
    return 0;
}

/* --- connections ----------------------------------------------------------------------------------- */

static void ep_set(conn_t *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)c->id};
    if (c->events == events) return;
    epoll_ctl(epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev);
    c->events = events;
}

static void req_free(req_t *r) {
    free(r->body);
    free(r);
}

static void conn_down(conn_t *c, int kind, ns_t retry_in) {
    /* Every request in flight on ``c`` is lost to ``kind``. */
    if (c->cur) {
        on_error(c->cur, kind);
        req_free(c->cur);
        c->cur = NULL;
    }
    if (c->h2) {
        nghttp2_session_del(c->h2); /* does not call on_stream_close: the list below is ours */
        c->h2 = NULL;
    }
    while (c->inflight) {
        req_t *r = c->inflight;
        c->inflight = r->next;
        on_error(r, kind);
        req_free(r);
    }
    c->n_inflight = 0;
    c->settings = 0;
    c->h2out_len = c->h2out_off = 0;
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->events = 0;
    c->in_len = 0;
    if (c->state == 2) disconnects++;
    c->state = 0;
    c->retry_at = now_ns() + retry_in;
}

static void h2_setup(conn_t *c);

static void conn_start(conn_t *c) {
    c->fd = socket(addr->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket() failed");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->events = 0;
    c->answered = 0;
    if (connect(c->fd, addr->ai_addr, addr->ai_addrlen) == 0) {
        c->state = 2;
        c->avail_at = now_ns();
        ep_set(c, EPOLLIN);
        if (opt.mode == MODE_GRPC) h2_setup(c);
    } else if (errno == EINPROGRESS) {
        c->state = 1;
        ep_set(c, EPOLLOUT);
    } else {
        connect_failures++;
        c->state = 0;
        conn_down(c, ERR_CONNECT, CONNECT_RETRY_NS);
    }
}

static void conn_connected(conn_t *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
        connect_failures++;
        c->state = 0;
        conn_down(c, ERR_CONNECT, CONNECT_RETRY_NS);
        return;
    }
    c->state = 2;
    c->avail_at = now_ns();
    ep_set(c, EPOLLIN);
    if (opt.mode == MODE_GRPC) h2_setup(c);
}

/* --- HTTP/1.1 -------------------------------------------------------------------------------------- */

/* One response at the start of b[0..n): 1 complete (*used bytes, *status, *close_after), 0 need more,
 * -1 malformed. ``eof``: the server has closed (ends a body framed by the close). */
static int http_parse(const char *b, size_t n, int eof, size_t *used, int *status, int *close_after) {
    const char *end = memmem(b, n, "\r\n\r\n", 4);
    if (!end) return n > MAX_RESPONSE ? -1 : 0;
    size_t hdr_len = (size_t)(end - b) + 4;
    if (n < 12 || memcmp(b, "HTTP/1.", 7) || !isdigit((unsigned char)b[7]) || b[8] != ' ') return -1;
    if (!isdigit((unsigned char)b[9]) || !isdigit((unsigned char)b[10]) || !isdigit((unsigned char)b[11])) return -1;
    if (hdr_len > 12 && b[12] != ' ' && b[12] != '\r') return -1;
    *status = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
    if (*status < 100 || *status > 599) return -1;
    int chunked = 0, have_cl = 0;
    unsigned long long cl = 0;
    *close_after = b[7] == '0';
    const char *line = memchr(b, '\n', hdr_len) + 1;
    while (line < end) {
        const char *eol = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        const char *colon = memchr(line, ':', (size_t)(eol - line));
        if (!colon || colon == line) return -1;
        size_t name_len = (size_t)(colon - line);
        const char *v = colon + 1;
        while (v < eol && (*v == ' ' || *v == '\t')) v++;
        size_t v_len = (size_t)(eol - v);
        while (v_len && (v[v_len - 1] == ' ' || v[v_len - 1] == '\t')) v_len--;
        if (name_len == 14 && !strncasecmp(line, "content-length", 14)) {
            if (!v_len || v_len > 15) return -1;
            unsigned long long x = 0;
            for (size_t i = 0; i < v_len; i++) {
                if (!isdigit((unsigned char)v[i])) return -1;
                x = x * 10 + (unsigned)(v[i] - '0');
            }
            if (have_cl && x != cl) return -1;
            cl = x;
            have_cl = 1;
        } else if (name_len == 17 && !strncasecmp(line, "transfer-encoding", 17)) {
            chunked = memmem(v, v_len, "chunked", 7) != NULL;
            if (!chunked) return -1; /* only chunked is understood */
        } else if (name_len == 10 && !strncasecmp(line, "connection", 10)) {
            for (size_t i = 0; i + 5 <= v_len; i++)
                if (!strncasecmp(v + i, "close", 5)) *close_after = 1;
        }
        line = eol + 2;
    }
    if (*status < 200 || *status == 204 || *status == 304) {
        *used = hdr_len; /* no body (1xx are interim: the caller reads on) */
        return 1;
    }
    if (chunked) {
        size_t pos = hdr_len;
        for (;;) {
            const char *eol = memmem(b + pos, n - pos, "\r\n", 2);
            if (!eol) return n - pos > 1024 ? -1 : 0;
            unsigned long long size = 0;
            const char *p = b + pos;
            if (p == eol || !isxdigit((unsigned char)*p)) return -1;
            for (; p < eol && isxdigit((unsigned char)*p); p++) {
                if (size > (MAX_RESPONSE >> 4)) return -1;
                size = size * 16 + (unsigned)(isdigit((unsigned char)*p) ? *p - '0' : (tolower(*p) - 'a' + 10));
            }
            if (p < eol && *p != ';' && *p != ' ') return -1;
            pos = (size_t)(eol - b) + 2;
            if (size == 0) { /* trailers, then an empty line */
                if (n - pos >= 2 && !memcmp(b + pos, "\r\n", 2)) {
                    *used = pos + 2;
                    return 1;
                }
                const char *t = memmem(b + pos, n - pos, "\r\n\r\n", 4);
                if (!t) return n - pos > 65536 ? -1 : 0;
                *used = (size_t)(t - b) + 4;
                return 1;
            }
            if (n - pos < size + 2) return n > MAX_RESPONSE ? -1 : 0;
            if (memcmp(b + pos + size, "\r\n", 2)) return -1;
            pos += size + 2;
        }
    }
    if (have_cl) {
        if (cl > MAX_RESPONSE) return -1;
        if (n - hdr_len < cl) return 0;
        *used = hdr_len + cl;
        return 1;
    }
    *close_after = 1; /* body ends with the connection */
    if (!eof) return n > MAX_RESPONSE ? -1 : 0;
    *used = n;
    return 1;
}

static void http_write(conn_t *c) {
    req_t *r = c->cur;
    while (r && c->out_off < r->payload->len) {
        ssize_t w = send(c->fd, r->payload->data + c->out_off, r->payload->len - c->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                ep_set(c, EPOLLIN | EPOLLOUT);
                return;
            }
            conn_down(c, ERR_CLOSED, CLOSE_RETRY_NS);
            return;
        }
        c->out_off += (size_t)w;
    }
    ep_set(c, EPOLLIN);
}

static void http_read(conn_t *c) {
    int eof = 0;
    for (;;) {
        if (c->in_cap - c->in_len < 16384) {
            c->in_cap = c->in_cap ? c->in_cap * 2 : 65536;
            c->in = realloc(c->in, c->in_cap);
            if (!c->in) die("out of memory");
        }
        size_t room = c->in_cap - c->in_len;
        ssize_t n = recv(c->fd, c->in + c->in_len, room, 0);
        if (n > 0) {
            c->in_len += (size_t)n;
            if ((size_t)n < room || c->in_len > MAX_RESPONSE + 65536) break; /* drained: no EAGAIN round trip */
            continue;
        }
        if (n == 0) eof = 1;
        else if (errno != EAGAIN && errno != EINTR) eof = 1;
        if (n < 0 && errno == EINTR) continue;
        break;
    }
    ns_t t = now_ns();
    while (c->in_len) {
        if (!c->cur) { /* bytes nobody asked for */
            unsolicited++;
            conn_down(c, ERR_MALFORMED, CLOSE_RETRY_NS);
            return;
        }
        size_t used = 0;
        int status = 0, close_after = 0;
        int rc = http_parse(c->in, c->in_len, eof, &used, &status, &close_after);
        if (rc == 0) break;
        if (rc < 0) {
            conn_down(c, ERR_MALFORMED, CLOSE_RETRY_NS);
            return;
        }
        memmove(c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
        if (status < 200) continue; /* interim */
        req_t *r = c->cur;
        c->cur = NULL;
        if (r->in_window) http_status[status]++;
        on_answer(r, t);
        req_free(r);
        c->answered++;
        c->avail_at = t;
        if (close_after) {
            if (c->in_len) { /* bytes after a closing answer */
                unsolicited++;
                conn_down(c, ERR_MALFORMED, CLOSE_RETRY_NS);
                return;
            }
            close(c->fd);
            c->fd = -1;
            c->state = 0;
            disconnects++;
            c->retry_at = t; /* the server said so: reconnect now */
            return;
        }
    }
    if (eof) conn_down(c, ERR_CLOSED, c->answered ? 0 : CLOSE_RETRY_NS);
}

/* --- HTTP/2 (gRPC) --------------------------------------------------------------------------------- */

static int h2_limit(const conn_t *c) {
    uint32_t peer = nghttp2_session_get_remote_settings(c->h2, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
    return (int)(peer < (uint32_t)opt.max_streams ? peer : (uint32_t)opt.max_streams);
}

static int h2_room(const conn_t *c) {
    return (!opt.pool_max || c->settings) && c->n_inflight < h2_limit(c);
}

static int h2_frame_cb(nghttp2_session *s, const nghttp2_frame *f, void *u) {
    (void)s;
    conn_t *c = u;
    if (f->hd.type == NGHTTP2_SETTINGS && !(f->hd.flags & NGHTTP2_FLAG_ACK)) {
        c->settings = 1;
        last_limit = h2_limit(c);
        if (opt.pool_max && c->n_inflight < last_limit) c->avail_at = now_ns(); /* room from now on */
    }
    return 0;
}

static int h2_header_cb(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name, size_t nlen,
                        const uint8_t *value, size_t vlen, uint8_t flags, void *u) {
    (void)flags;
    (void)u;
    req_t *r = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (!r) return 0;
    if (nlen == 7 && !memcmp(name, ":status", 7)) {
        r->http_status = 0;
        for (size_t i = 0; i < vlen && i < 3; i++) r->http_status = r->http_status * 10 + (value[i] - '0');
    } else if (nlen == 11 && !memcmp(name, "grpc-status", 11)) {
        int v = 0, ok = vlen > 0 && vlen <= 2;
        for (size_t i = 0; ok && i < vlen; i++) {
            ok = isdigit(value[i]);
            v = v * 10 + (value[i] - '0');
        }
        r->grpc_status = ok && v <= 16 ? v : 18; /* not a code: counted as "other" */
    }
    return 0;
}

static int h2_data_cb(nghttp2_session *s, uint8_t flags, int32_t stream_id, const uint8_t *data, size_t len,
                      void *u) {
    (void)flags;
    (void)u;
    req_t *r = nghttp2_session_get_stream_user_data(s, stream_id);
    if (!r) return 0;
    size_t keep = r->body_len + len > MAX_BODY_KEPT ? MAX_BODY_KEPT - r->body_len : len;
    if (keep) {
        char *b = realloc(r->body, r->body_len + keep);
        if (!b) return NGHTTP2_ERR_CALLBACK_FAILURE;
        memcpy(b + r->body_len, data, keep);
        r->body = b;
        r->body_len += keep;
    }
    return 0;
}

/* Whether a gRPC answer with grpc-status 0 allows (the --allow rule on its first message); -1 malformed. */
static int grpc_allows(const req_t *r) {
    if (!opt.allow) return 1;
    if (r->body_len < 5 || r->body[0] != 0) return -1;
    uint32_t n = ((uint32_t)(uint8_t)r->body[1] << 24) | ((uint32_t)(uint8_t)r->body[2] << 16) |
                 ((uint32_t)(uint8_t)r->body[3] << 8) | (uint8_t)r->body[4];
    if (n > r->body_len - 5) return -1;
    uint64_t v;
    const uint8_t *p = (const uint8_t *)r->body + 5;
    if (pb_get(p, p + n, opt.allow_path, opt.allow_depth, &v)) return -1;
    return v == opt.allow_value;
}

static int h2_close_cb(nghttp2_session *s, int32_t stream_id, uint32_t error_code, void *u) {
    conn_t *c = u;
    req_t *r = nghttp2_session_get_stream_user_data(s, stream_id);
    if (!r) return 0;
    nghttp2_session_set_stream_user_data(s, stream_id, NULL);
    if (r->prev) r->prev->next = r->next;
    else c->inflight = r->next;
    if (r->next) r->next->prev = r->prev;
    ns_t t = now_ns();
    if (c->n_inflight-- >= h2_limit(c)) c->avail_at = t; /* it was full: room from now on (else it had room) */
    if (error_code) {
        on_error(r, ERR_RESET);
    } else if (r->http_status < 0) {
        on_error(r, ERR_MALFORMED);
    } else {
        int g = r->grpc_status < 0 ? 17 : r->grpc_status, a = g == 0 ? grpc_allows(r) : 0;
        c->answered++;
        if (a < 0) { /* grpc-status 0 with an answer the allow rule cannot read */
            on_error(r, ERR_MALFORMED);
        } else {
            on_answer(r, t);
            if (r->in_window) {
                grpc_status[g]++;
                allowed += g == 0 && a;
                denied += g == 0 && !a;
            }
        }
    }
    req_free(r);
    return 0;
}

static ssize_t h2_body_cb(nghttp2_session *s, int32_t stream_id, uint8_t *buf, size_t len, uint32_t *flags,
                          nghttp2_data_source *src, void *u) {
    (void)s;
    (void)stream_id;
    (void)u;
    req_t *r = src->ptr;
    size_t n = r->payload->len - r->off;
    if (n > len) n = len;
    memcpy(buf, r->payload->data + r->off, n);
    r->off += n;
    if (r->off == r->payload->len) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return (ssize_t)n;
}

/* Gather every frame nghttp2 has to send and write them with one send() (a request's HEADERS and DATA
 * frames would otherwise cost a system call each); what the socket does not take waits for EPOLLOUT. */
static void h2_flush(conn_t *c) {
    for (;;) {
        if (c->h2out_off < c->h2out_len) {
            ssize_t w = send(c->fd, c->h2out + c->h2out_off, c->h2out_len - c->h2out_off, MSG_NOSIGNAL);
            if (w < 0 && errno != EAGAIN && errno != EINTR) {
                conn_down(c, ERR_CLOSED, CLOSE_RETRY_NS);
                return;
            }
            if (w > 0) c->h2out_off += (size_t)w;
            if (c->h2out_off < c->h2out_len) {
                ep_set(c, EPOLLIN | EPOLLOUT);
                return;
            }
        }
        c->h2out_len = c->h2out_off = 0;
        for (;;) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(c->h2, &data);
            if (n < 0) {
                conn_down(c, ERR_MALFORMED, CLOSE_RETRY_NS);
                return;
            }
            if (n == 0) break;
            if (c->h2out_len + (size_t)n > c->h2out_cap) {
                c->h2out_cap = (c->h2out_len + (size_t)n) * 2;
                c->h2out = realloc(c->h2out, c->h2out_cap);
                if (!c->h2out) die("out of memory");
            }
            memcpy(c->h2out + c->h2out_len, data, (size_t)n);
            c->h2out_len += (size_t)n;
            if (c->h2out_len >= 65536) break;
        }
        if (!c->h2out_len) break;
    }
    ep_set(c, EPOLLIN);
}

static void h2_setup(conn_t *c) {
    nghttp2_session_callbacks *cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_header_callback(cb, h2_header_cb);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, h2_data_cb);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, h2_close_cb);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, h2_frame_cb);
    nghttp2_session_client_new(&c->h2, cb, c);
    nghttp2_session_callbacks_del(cb);
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
                                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 24}};
    nghttp2_submit_settings(c->h2, NGHTTP2_FLAG_NONE, iv, 2);
    nghttp2_session_set_local_window_size(c->h2, NGHTTP2_FLAG_NONE, 0, 1 << 24);
    h2_flush(c);
}

static void h2_read(conn_t *c) {
    uint8_t buf[65536];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0) {
            if (nghttp2_session_mem_recv(c->h2, buf, (size_t)n) < 0) {
                conn_down(c, ERR_MALFORMED, CLOSE_RETRY_NS);
                return;
            }
            if (!c->h2) return;
            if ((size_t)n < sizeof buf) break; /* drained: no EAGAIN round trip */
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) break;
        conn_down(c, ERR_CLOSED, c->answered ? 0 : CLOSE_RETRY_NS);
        return;
    }
    if (!nghttp2_session_want_read(c->h2) && !nghttp2_session_want_write(c->h2)) {
        conn_down(c, ERR_CLOSED, CLOSE_RETRY_NS); /* GOAWAY done */
        return;
    }
    h2_flush(c);
}

/* --- sending --------------------------------------------------------------------------------------- */

static const buf_t *next_payload_buf(void) {
    size_t i = next_payload++;
    if (i >= n_payloads) reused++;
    return &payloads[i % n_payloads];
}

static conn_t *available(void) {
    static int rr;
    for (int k = 0; k < n_conns; k++) {
        conn_t *c = &conns[(rr + k) % n_conns];
        if (c->state != 2) continue;
        if (opt.mode == MODE_HTTP ? c->cur == NULL : (c->h2 && h2_room(c))) {
            rr = (rr + k + 1) % n_conns;
            return c;
        }
    }
    return NULL;
}

static void conn_start(conn_t *c);

/* Pool mode: as Envoy's pool, open connections while the waiting requests exceed what the connections not
 * yet able to take any (connecting, or awaiting the peer's SETTINGS) are expected to take, up to --pool-max. */
static void grow(size_t waiting) {
    if (!opt.pool_max) return;
    size_t expected = 0, per = (size_t)(last_limit ? last_limit : opt.max_streams);
    for (int k = 0; k < n_conns; k++)
        if (conns[k].state == 1 || (conns[k].state == 2 && !conns[k].settings)) expected += per;
    while (waiting > expected && n_conns < opt.pool_max) {
        conn_t *c = &conns[n_conns];
        c->id = n_conns++;
        c->fd = -1;
        conn_start(c);
        expected += per;
    }
}

static void send_one(conn_t *c, size_t i) {
    req_t *r = calloc(1, sizeof *r);
    if (!r) die("out of memory");
    r->intended = sched[i];
    r->in_window = r->intended >= win_start && r->intended < win_end;
    r->ready = r->intended > c->avail_at ? r->intended : c->avail_at;
    r->payload = next_payload_buf();
    r->conn = c;
    r->http_status = r->grpc_status = -1;
    r->sent = now_ns();
    on_sent(r);
    if (opt.mode == MODE_HTTP) {
        c->cur = r;
        c->out_off = 0;
        http_write(c);
        return;
    }
    char authority[300], ctype[] = "application/grpc", te[] = "trailers";
    snprintf(authority, sizeof authority, "%s", opt.authority ? opt.authority : opt.host);
    nghttp2_nv nv[8];
    int n = 0;
#define NV(k, v) nv[n++] = (nghttp2_nv){(uint8_t *)(k), (uint8_t *)(v), strlen(k), strlen(v), NGHTTP2_NV_FLAG_NONE}
    NV(":method", "POST");
    NV(":scheme", "http");
    NV(":path", opt.path);
    NV(":authority", authority);
    NV("content-type", ctype);
    NV("te", te);
    if (opt.grpc_timeout) NV("grpc-timeout", opt.grpc_timeout);
#undef NV
    nghttp2_data_provider dp = {.source.ptr = r, .read_callback = h2_body_cb};
    int32_t id = nghttp2_submit_request(c->h2, NULL, nv, (size_t)n, &dp, r);
    if (id < 0) {
        on_error(r, ERR_CLOSED);
        req_free(r);
        return;
    }
    r->next = c->inflight;
    if (c->inflight) c->inflight->prev = r;
    c->inflight = r;
    c->n_inflight++;
    h2_flush(c);
}

static void dispatch(void) {
    ns_t t = now_ns();
    while (due < n_sched && sched[due] <= t) due++;
    while (dispatched < due) {
        conn_t *c = available();
        if (!c) break;
        send_one(c, dispatched++);
    }
    if (dispatched < due) grow(due - dispatched);
}

/* --- schedule, input ------------------------------------------------------------------------------- */

static void build_schedule(ns_t start) {
    double total = opt.warmup + opt.duration;
    size_t cap = (size_t)(opt.rate * total * (opt.poisson ? 1.5 : 1.0)) + 64;
    sched = malloc(cap * sizeof *sched);
    if (!sched) die("out of memory");
    double t = 0;
    srand48(opt.seed);
    n_sched = 0;
    for (size_t i = 0;; i++) {
        t = opt.poisson ? t - log(1.0 - drand48()) / opt.rate : (double)i / opt.rate;
        if (t >= total) break;
        if (n_sched == cap) {
            cap *= 2;
            sched = realloc(sched, cap * sizeof *sched);
            if (!sched) die("out of memory");
        }
        sched[n_sched++] = start + (ns_t)(t * NS);
    }
    win_start = start + (ns_t)(opt.warmup * NS);
    win_end = start + (ns_t)(total * NS);
    deadline = win_end + (ns_t)(opt.drain * NS);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 65536, n = 0;
    char *b = malloc(cap);
    for (size_t got; b && (got = fread(b + n, 1, cap - n, f)) > 0;) {
        n += got;
        if (n == cap) b = realloc(b, cap *= 2);
    }
    fclose(f);
    *len = n;
    return b;
}

static void load_payloads(void) {
    size_t len;
    char *data = read_file(opt.payloads ? opt.payloads : opt.raw, &len);
    if (!data) die("cannot read the payload file");
    if (opt.raw) {
        payloads = malloc(sizeof *payloads);
        payloads[0] = (buf_t){data, len};
        n_payloads = 1;
        return;
    }
    size_t cap = 16;
    payloads = malloc(cap * sizeof *payloads);
    for (size_t pos = 0; pos < len;) {
        if (len - pos < 4) die("payload file: truncated record");
        uint32_t n = ((uint32_t)(uint8_t)data[pos] << 24) | ((uint32_t)(uint8_t)data[pos + 1] << 16) |
                     ((uint32_t)(uint8_t)data[pos + 2] << 8) | (uint8_t)data[pos + 3];
        pos += 4;
        if (n > len - pos) die("payload file: truncated record");
        if (n_payloads == cap) payloads = realloc(payloads, (cap *= 2) * sizeof *payloads);
        buf_t b = {malloc(n + 5), n};
        if (opt.mode == MODE_GRPC) { /* a message: add the gRPC frame */
            b.data[0] = 0;
            b.data[1] = (char)(n >> 24), b.data[2] = (char)(n >> 16), b.data[3] = (char)(n >> 8), b.data[4] = (char)n;
            memcpy(b.data + 5, data + pos, n);
            b.len = n + 5;
        } else {
            memcpy(b.data, data + pos, n);
        }
        payloads[n_payloads++] = b;
        pos += n;
    }
    free(data);
    if (!n_payloads) die("payload file: no records");
}

static void parse_allow(const char *s) {
    char *end;
    for (;;) {
        long f = strtol(s, &end, 10);
        if (end == s || f < 1 || opt.allow_depth == 8) die("--allow: expected FIELD[.FIELD...]=VALUE");
        opt.allow_path[opt.allow_depth++] = (int)f;
        if (*end == '.') s = end + 1;
        else break;
    }
    if (*end != '=') die("--allow: expected FIELD[.FIELD...]=VALUE");
    opt.allow_value = strtoull(end + 1, &end, 10);
    if (*end) die("--allow: expected FIELD[.FIELD...]=VALUE");
}

static void usage(void) {
    fputs("usage: openloop --mode http|grpc --addr HOST:PORT --rate R (--payloads FILE | --raw FILE)\n"
          "  [--connections N] [--duration S] [--warmup S] [--drain S] [--poisson] [--seed N]\n"
          "  [--path /pkg.Svc/Method] [--authority A] [--grpc-timeout 100m] [--allow 1.1=0]\n"
          "  [--max-streams N] [--pool-max M] [--spin-us N] [--max-lead-us N] [--go-stdin]\n",
          stderr);
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static struct option longopts[] = {
        {"mode", 1, 0, 'm'},         {"addr", 1, 0, 'a'},      {"rate", 1, 0, 'r'},
        {"connections", 1, 0, 'c'},  {"duration", 1, 0, 'd'},  {"warmup", 1, 0, 'w'},
        {"drain", 1, 0, 'D'},        {"poisson", 0, 0, 'P'},   {"seed", 1, 0, 's'},
        {"payloads", 1, 0, 'p'},     {"raw", 1, 0, 'R'},       {"path", 1, 0, 'u'},
        {"authority", 1, 0, 'A'},    {"grpc-timeout", 1, 0, 'T'}, {"allow", 1, 0, 'L'},
        {"max-streams", 1, 0, 'M'},  {"spin-us", 1, 0, 'S'},   {"max-lead-us", 1, 0, 'E'},   {"go-stdin", 0, 0, 'g'},
        {"pool-max", 1, 0, 'O'},     {0, 0, 0, 0}};
    int ch;
    const char *a = NULL, *mode = "http";
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'm': mode = optarg; break;
        case 'a': a = optarg; break;
        case 'r': opt.rate = atof(optarg); break;
        case 'c': opt.connections = atoi(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'D': opt.drain = atof(optarg); break;
        case 'P': opt.poisson = 1; break;
        case 's': opt.seed = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'p': opt.payloads = optarg; break;
        case 'R': opt.raw = optarg; break;
        case 'u': opt.path = optarg; break;
        case 'A': opt.authority = optarg; break;
        case 'T': opt.grpc_timeout = optarg; break;
        case 'L': opt.allow = optarg; parse_allow(optarg); break;
        case 'M': opt.max_streams = atoi(optarg); break;
        case 'O': opt.pool_max = atoi(optarg); break;
        case 'S': opt.spin_us = atoi(optarg); break;
        case 'E': opt.max_lead_us = atoi(optarg); break;
        case 'g': opt.go_stdin = 1; break;
        default: usage();
        }
    }
    if (optind != argc || !a || (!opt.payloads == !opt.raw)) usage();
    if (!strcmp(mode, "http")) opt.mode = MODE_HTTP;
    else if (!strcmp(mode, "grpc")) opt.mode = MODE_GRPC;
    else usage();
    if (!(opt.rate > 0 && opt.rate <= 1e6) || opt.connections < 1 || opt.connections > 10000) die("bad --rate or --connections");
    if (!(opt.duration > 0 && opt.duration <= 86400) || opt.warmup < 0 || opt.drain < 0 || opt.max_streams < 1)
        die("bad --duration, --warmup, --drain or --max-streams");
    if (opt.pool_max && (opt.pool_max < opt.connections || opt.pool_max > 10000))
        die("bad --pool-max: at least --connections, at most 10000");
    if (opt.rate * (opt.duration + opt.warmup) > 5e7) die("schedule too long (rate x (duration + warmup) > 5e7)");
    const char *colon = strrchr(a, ':');
    if (!colon || colon == a || (size_t)(colon - a) >= sizeof opt.host || strlen(colon + 1) >= sizeof opt.port)
        die("--addr: expected HOST:PORT");
    const char *h = a;
    size_t hl = (size_t)(colon - a);
    if (h[0] == '[' && hl > 2 && h[hl - 1] == ']') h++, hl -= 2;
    memcpy(opt.host, h, hl);
    opt.host[hl] = 0;
    strcpy(opt.port, colon + 1);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    if (getaddrinfo(opt.host, opt.port, &hints, &addr)) die("--addr: cannot resolve");
}

/* --- output ---------------------------------------------------------------------------------------- */

static void print_hist(const char *name, const hist_t *h) {
    static const double ps[] = {50, 90, 99, 99.9, 100};
    static const char *names[] = {"p50", "p90", "p99", "p99.9", "max"};
    printf("\"%s\": {\"count\": %llu, \"mean\": %.3f", name, (unsigned long long)h->n, h->n ? h->sum / h->n / 1e3 : 0.0);
    for (int i = 0; i < 5; i++) printf(", \"%s\": %.3f", names[i], h_percentile(h, ps[i]) / 1e3);
    printf(", \"buckets\": [");
    /* [value_us, count]: each bucket's middle, rounded to a whole microsecond (at least 1), merged */
    long long last_v = -1;
    unsigned long long acc = 0;
    int first = 1;
    for (int i = 0; i <= NBUCKETS; i++) {
        long long v = -2;
        if (i < NBUCKETS) {
            if (!h->c[i]) continue;
            v = llround((h_low(i) + h_high(i)) / 2.0 / 1e3);
            if (v < 1) v = 1;
        }
        if (v != last_v && acc) {
            printf("%s[%lld, %llu]", first ? "" : ", ", last_v, acc);
            first = 0;
            acc = 0;
        }
        if (i < NBUCKETS) {
            last_v = v;
            acc += h->c[i];
        }
    }
    printf("]}");
}

static void print_result(ns_t start, double cpu_s) {
    printf("{\"tool\": \"openloop\", \"mode\": \"%s\", \"rate\": %.3f, \"connections\": %d, \"poisson\": %s, ",
           opt.mode == MODE_HTTP ? "http" : "grpc", opt.rate, opt.connections, opt.poisson ? "true" : "false");
    printf("\"pool_max\": %d, \"connections_opened\": %d, ", opt.pool_max, n_conns);
    uint64_t scheduled = 0;
    for (size_t i = 0; i < n_sched; i++) scheduled += sched[i] >= win_start && sched[i] < win_end;
    printf("\"window_s\": %.6f, \"scheduled\": %llu, \"sent\": %llu, \"completed\": %llu, \"allowed\": %llu, "
           "\"denied\": %llu, \"dropped\": %llu, \"reused_payloads\": %zu, ",
           (win_end - win_start) / 1e9, (unsigned long long)scheduled, (unsigned long long)sent_in_window,
           (unsigned long long)completed, (unsigned long long)allowed, (unsigned long long)denied,
           (unsigned long long)dropped, reused);
    printf("\"errors\": {");
    for (int k = 0; k < N_ERR; k++) printf("%s\"%s\": %llu", k ? ", " : "", ERR_NAMES[k], (unsigned long long)errors[k]);
    printf("}, \"connect_failures\": %llu, \"disconnects\": %llu, \"unsolicited\": %llu, \"http_status\": {",
           (unsigned long long)connect_failures, (unsigned long long)disconnects, (unsigned long long)unsolicited);
    int first = 1;
    for (int s = 0; s < 600; s++)
        if (http_status[s]) printf("%s\"%d\": %llu", first ? "" : ", ", s, (unsigned long long)http_status[s]), first = 0;
    printf("}, \"grpc_status\": {");
    first = 1;
    for (int s = 0; s < 19; s++) {
        if (!grpc_status[s]) continue;
        char key[16];
        snprintf(key, sizeof key, "%d", s);
        printf("%s\"%s\": %llu", first ? "" : ", ", s == 17 ? "missing" : s == 18 ? "other" : key,
               (unsigned long long)grpc_status[s]);
        first = 0;
    }
    printf("}, \"cpu_s\": %.6f, \"wall_s\": %.6f, ", cpu_s, (now_ns() - start) / 1e9);
    print_hist("latency", &latency);
    printf(", ");
    print_hist("service", &service);
    printf(", ");
    print_hist("lag", &lag);
    printf(", ");
    print_hist("wait", &wait_hist);
    printf("}\n");
    fflush(stdout);
}

/* --- the loop -------------------------------------------------------------------------------------- */

static void handle(conn_t *c, uint32_t ev) {
    if (c->state == 1) {
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) conn_connected(c);
        return;
    }
    if (c->state != 2) return;
    if (opt.mode == MODE_HTTP) {
        if (ev & EPOLLOUT) http_write(c);
        if (c->state == 2 && (ev & (EPOLLIN | EPOLLERR | EPOLLHUP))) http_read(c);
    } else {
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) h2_read(c);
        else if (ev & EPOLLOUT) h2_flush(c);
    }
}

/* One turn: wait for an event or until ``wake`` (absolute ns), then handle what came. One hrtimer per
 * sleep (epoll_pwait2's timeout, 1 ns timer slack): re-arming a timerfd as well doubled the cost of a wake-up.
 * A wake-up comes late by about the same time each time (20-30 us on this project's VM even at real-time
 * priority), so the sleep ends ``lead`` early, ``lead`` being the running average of the overshoot (at most
 * --max-lead-us), and the caller polls the few microseconds left: the send lands on time for the cost of a
 * short spin instead of a wake-up's worth of lag. --spin-us N spins the last N us outright. */
static void turn(ns_t wake) {
    static int no_pwait2;
    static ns_t lead;
    struct epoll_event evs[256];
    ns_t target = wake - (ns_t)opt.spin_us * 1000 - lead, rel = target - now_ns();
    if (rel < 0) rel = 0;
    int n;
    if (!no_pwait2) {
        struct timespec ts = {.tv_sec = rel / NS, .tv_nsec = rel % NS};
        n = epoll_pwait2(epfd, evs, 256, &ts, NULL);
        if (n < 0 && errno == ENOSYS) no_pwait2 = 1;
    }
    if (no_pwait2) n = epoll_wait(epfd, evs, 256, (int)((rel + 999999) / 1000000)); /* kernels before 5.11 */
    if (n == 0 && rel > 0) { /* slept the whole timeout: learn how late it woke us */
        ns_t late = now_ns() - target, max = (ns_t)opt.max_lead_us * 1000;
        lead += ((late > max ? max : late) - lead) / 8; /* a preempted sleep counts as at most max */
        lead = lead < 0 ? 0 : lead;
    }
    for (int i = 0; i < n; i++) handle(&conns[evs[i].data.u32], evs[i].events);
}

static int inflight_total(void) {
    int n = 0;
    for (int k = 0; k < n_conns; k++) n += opt.mode == MODE_HTTP ? conns[k].cur != NULL : conns[k].n_inflight;
    return n;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    load_payloads();
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (opt.mode == MODE_HTTP) opt.pool_max = 0; /* one request per connection: the pool is gRPC's */
    n_conns = opt.connections;
    conns = calloc((size_t)(opt.pool_max ? opt.pool_max : opt.connections), sizeof *conns);
    for (int k = 0; k < n_conns; k++) {
        conns[k].id = k;
        conns[k].fd = -1;
        conn_start(&conns[k]);
    }
    alarm(60); /* connecting and waiting for "go" */
    for (ns_t until = now_ns() + NS; now_ns() < until;) { /* connect (at most 1 s) */
        int pending = 0;
        for (int k = 0; k < n_conns; k++) pending += conns[k].state == 1;
        if (!pending) break;
        turn(until);
    }
    ns_t start = now_ns() + NS / 10;
    if (opt.go_stdin) {
        char line[128];
        double go;
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin) || sscanf(line, "go %lf", &go) != 1) die("expected \"go <seconds>\"");
        start = (ns_t)(go * NS);
    }
    build_schedule(start);
    alarm((unsigned)((deadline - now_ns()) / NS) + 30); /* the per-run timeout */
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    while (now_ns() < start) turn(start);
    for (;;) {
        ns_t t = now_ns();
        if (t >= deadline) break;
        for (int k = 0; k < n_conns; k++)
            if (conns[k].state == 0 && conns[k].retry_at <= t) conn_start(&conns[k]);
        dispatch();
        if (dispatched == n_sched && !inflight_total()) break;
        ns_t wake = due < n_sched ? sched[due] : deadline;
        if (wake > deadline) wake = deadline;
        for (int k = 0; k < n_conns; k++)
            if (conns[k].state == 0 && conns[k].retry_at < wake) wake = conns[k].retry_at;
        turn(wake);
    }
    /* What the window scheduled and never got answered: dropped, charged until the deadline. */
    ns_t end = now_ns() < deadline ? now_ns() : deadline;
    for (size_t i = dispatched; i < n_sched; i++)
        if (sched[i] >= win_start && sched[i] < win_end) dropped++, h_record(&latency, end - sched[i]);
    for (int k = 0; k < n_conns; k++) {
        conn_t *c = &conns[k];
        if (c->cur && c->cur->in_window) dropped++, h_record(&latency, end - c->cur->intended);
        for (req_t *r = c->inflight; r; r = r->next)
            if (r->in_window) dropped++, h_record(&latency, end - r->intended);
    }
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    print_result(start, cpu);
    return 0;
}
