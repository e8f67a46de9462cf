/* A fixed-rate, open-loop HTTP/1.1 load generator for bench/ingest.py (its own process).
 *
 * Request i is due at start + i/rate whether or not earlier answers came back, so a slow
 * server cannot slow the offered load down (no coordinated omission): each latency is
 * measured from the moment the request was *due* to the moment its full answer was read.
 * Written in C, single-threaded on epoll + an absolute timerfd that wakes it at each due time,
 * so its own lateness stays far below the latencies measured. Its user-space work is a few
 * microseconds per request; most of its CPU is the kernel's (loopback TCP, a sleep and a wake-up
 * per request), which exact timing cannot batch away.
 *
 * Usage: openloop HOST PORT BODIES_FILE RATE SECONDS  -> one JSON line on stdout
 * BODIES_FILE: one request a line, "timestamp TAB signature TAB body"; each is sent once.
 * generator_lag_*: how late the generator got to a request: the clock just before it wrote
 * the request (or opened a connection for it), or, if all MAX_CONN connections were busy, when
 * it found none free (the wait for a connection then shows in the latency, not the lag).
 * OPENLOOP_DUMP=FILE (bench/ingest_during_pass.py): after the run, and outside its timing, FILE
 * gets every request's latency and status: int64 start (CLOCK_MONOTONIC ns) and n, then n int64
 * latencies in ns (-1: unanswered), then n int32 HTTP statuses (0: unanswered).
 * Build: gcc -O2 -Wall -Wextra -std=gnu11 -o openloop bench/openloop.c -lm
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONN 256                 /* beyond this a request waits (FIFO) for a free connection */
#define IDLE_NS 3000000000LL         /* uvicorn closes keep-alive connections idle 5 s: never reuse one idle 3 s */
#define DRAIN_NS 30000000000LL       /* after the last due time, unanswered requests become errors after 30 s */
#define BUF 16384                    /* pacrecon's answers are tiny; a larger one is a protocol error here */

enum { FREE, CONNECTING, BUSY, IDLE, REFUSED };
typedef struct {
    int fd, state, out;              /* out: EPOLLOUT currently requested */
    long req;                        /* request in flight, -1 if none */
    size_t woff, blen;
    int64_t idle_since;
    char buf[BUF];
} conn;

static conn conns[MAX_CONN];
static conn *idle[MAX_CONN];
static int nidle, opened, ep;
static long n, inflight, ok2xx, recorded, other, errors, nlat;
static int64_t start, *lat, *lag;
static int64_t *rlat;                 /* for OPENLOOP_DUMP: latency per request, -1 unanswered */
static int32_t *rstat;                /* for OPENLOOP_DUMP: HTTP status per request, 0 unanswered */
static double rate;
static char *reqbuf;                 /* all requests back to back; request i is reqbuf[off[i]..off[i+1]) */
static size_t *off;
static struct addrinfo *addr;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}
static int64_t due(long i) { return start + (int64_t)((double)i * 1e9 / rate); }
static void die(const char *msg) { fprintf(stderr, "openloop: %s\n", msg); exit(2); }

static void load_requests(const char *path, const char *host) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    char *line = NULL;
    size_t cap = 0, size = 0, room = 1 << 20;
    off = malloc((n + 1) * sizeof *off);
    reqbuf = malloc(room);
    if (!off || !reqbuf) die("out of memory");
    long i = 0;
    ssize_t len;
    for (; i < n && (len = getline(&line, &cap, f)) >= 0; i++) {
        if (len && line[len - 1] == '\n') line[--len] = 0;
        char *sig = memchr(line, '\t', len), *body = sig ? memchr(sig + 1, '\t', line + len - sig - 1) : NULL;
        if (!body) { fprintf(stderr, "openloop: %s line %ld: expected timestamp TAB signature TAB body\n", path, i + 1); exit(2); }
        *sig++ = 0, *body++ = 0;
        size_t blen = line + len - body, need = strlen(host) + strlen(line) + strlen(sig) + blen + 256;
        while (size + need > room) if (!(reqbuf = realloc(reqbuf, room *= 2))) die("out of memory");
        off[i] = size;
        size += sprintf(reqbuf + size, "POST /webhooks/pacspace HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        "X-PacSpace-Timestamp: %s\r\nX-PacSpace-Signature: %s\r\nContent-Length: %zu\r\n\r\n", host, line, sig, blen);
        memcpy(reqbuf + size, body, blen);
        size += blen;
    }
    off[i] = size;
    free(line);
    fclose(f);
    if (i < n) { fprintf(stderr, "openloop: %s has %ld requests; %ld are needed\n", path, i, n); exit(2); }
}

static void watch(conn *c, int out) {  /* level-triggered EPOLLIN always; EPOLLOUT only while a write waits */
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (c->out != out && epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == 0) c->out = out;
}

static void drop(conn *c) {            /* close; the request in flight, if any, is an error (never retried) */
    if (c->req >= 0) errors++, inflight--;
    close(c->fd);                      /* also removes it from epoll */
    c->state = FREE, c->req = -1;
    opened--;
}

static void send_rest(conn *c) {
    const char *r = reqbuf + off[c->req];
    size_t len = off[c->req + 1] - off[c->req];
    while (c->woff < len) {
        ssize_t w = send(c->fd, r + c->woff, len - c->woff, MSG_NOSIGNAL);
        if (w < 0 && errno == EAGAIN) { watch(c, 1); return; }  /* socket buffer full: finish on EPOLLOUT */
        if (w < 0) { drop(c); return; }
        c->woff += w;
    }
    watch(c, 0);
}

static void connected(conn *c) {       /* EPOLLOUT/ERR on a connecting socket: did the connect work? */
    int err = 0;
    socklen_t sl = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0 || err) { drop(c); return; }
    c->state = BUSY;
    send_rest(c);
}

/* One status line, headers, and a Content-Length body: returns 1 when the answer is complete. */
static int answered(conn *c) {
    char *end = memmem(c->buf, c->blen, "\r\n\r\n", 4);
    if (!end) { if (c->blen == BUF) drop(c); return 0; }
    size_t head = end - c->buf + 4;
    *end = 0;                           /* terminates the header block for the string functions below */
    char *sp = memchr(c->buf, ' ', head), *cl = NULL, *closing = NULL;
    for (char *l = strstr(c->buf, "\r\n"); l; l = strstr(l + 2, "\r\n")) {
        if (!strncasecmp(l + 2, "content-length:", 15)) cl = l + 17;
        if (!strncasecmp(l + 2, "connection:", 11)) closing = !strncasecmp(l + 13 + strspn(l + 13, " "), "close", 5) ? l : closing;
    }
    if (!sp || !cl) { drop(c); return 0; }
    char *bad;
    long status = strtol(sp + 1, &bad, 10), length = strtol(cl, &bad, 10);
    if (bad == cl || length < 0 || head + length > BUF) { drop(c); return 0; }
    *end = '\r';
    if (c->blen < head + length) return 0;   /* body still on its way */
    int64_t t = now_ns();
    lat[nlat++] = t - due(c->req);
    rlat[c->req] = t - due(c->req), rstat[c->req] = (int32_t)status;
    if (status >= 200 && status < 300) {
        ok2xx++;
        recorded += memmem(c->buf + head, length, "\"recorded\"", 10) != NULL;
    } else other++;
    c->blen -= head + length;
    memmove(c->buf, c->buf + head + length, c->blen);
    c->req = -1, inflight--;
    if (closing || c->blen) { drop(c); return 1; }  /* server said close, or sent bytes nobody asked for */
    c->state = IDLE, c->idle_since = t;
    idle[nidle++] = c;
    return 1;
}

static void readable(conn *c) {
    ssize_t r = recv(c->fd, c->buf + c->blen, BUF - c->blen, 0);
    if (r < 0 && errno == EAGAIN) return;
    if (r <= 0 || c->state != BUSY) {  /* EOF/reset (an error if a request was in flight), or unasked bytes */
        if (c->state == IDLE) for (int k = 0; k < nidle; k++) if (idle[k] == c) { idle[k] = idle[--nidle]; break; }
        drop(c);
        return;
    }
    c->blen += r;
    answered(c);
}

static conn *take(int64_t t) {         /* an idle keep-alive connection (the most recent one), or a new one */
    while (nidle) {
        conn *c = idle[--nidle];
        if (t - c->idle_since < IDLE_NS) return c;
        drop(c);                       /* too old: the server may be closing it right now */
    }
    if (opened >= MAX_CONN) return NULL;
    conn *c = conns;
    while (c->state != FREE) c++;
    opened++;
    c->req = -1, c->blen = 0, c->out = 1, c->state = CONNECTING;
    c->fd = socket(addr->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket() failed (out of file descriptors?)");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    if (connect(c->fd, addr->ai_addr, addr->ai_addrlen) == 0) c->state = BUSY;
    else if (errno != EINPROGRESS) c->state = REFUSED;  /* failed at once: the caller's request is an error */
    return c;
}

static long next_req, next_lag;        /* all requests < next_req are sent; all < next_lag have their lag */

static void dispatch(void) {           /* every due request, in order, onto a connection while one is free */
    while (next_req < n) {
        int64_t t = now_ns();
        if (due(next_req) > t) return;
        conn *c = take(t);
        if (!c) {                      /* all busy: the due ones queue (FIFO); note when we got to them */
            for (; next_lag < n && due(next_lag) <= t; next_lag++) lag[next_lag] = t - due(next_lag);
            return;
        }
        long i = next_req++;
        if (next_lag <= i) lag[i] = t - due(i), next_lag = i + 1;
        c->req = i, c->woff = 0, inflight++;
        if (c->state == BUSY) send_rest(c);
        else if (c->state == IDLE) c->state = BUSY, send_rest(c);
        else if (c->state == REFUSED) drop(c);
    }
}

static int cmp(const void *a, const void *b) { int64_t x = *(const int64_t *)a, y = *(const int64_t *)b; return (x > y) - (x < y); }
static double pct_ms(int64_t *v, long k, double q) {  /* as openloop.py did: sorted[min(k-1, int(q/100*k))] */
    if (!k) return NAN;
    long j = (long)(q / 100 * k);
    return v[j < k - 1 ? j : k - 1] / 1e6;
}
static void ms(const char *key, double v, const char *sep) {
    if (isnan(v)) printf("\"%s\": NaN%s", key, sep);  /* what Python's json.dumps wrote for nan */
    else printf("\"%s\": %.2f%s", key, v, sep);
}

int main(int argc, char **argv) {
    if (argc != 6) die("usage: openloop HOST PORT BODIES_FILE RATE SECONDS");
    rate = atof(argv[4]);
    double seconds = atof(argv[5]);
    if (!(rate > 0) || !(seconds >= 0)) die("RATE must be > 0 and SECONDS >= 0");
    n = (long)(rate * seconds);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    if (getaddrinfo(argv[1], argv[2], &hints, &addr)) die("cannot resolve HOST PORT");
    load_requests(argv[3], argv[1]);
    lat = malloc((n + 1) * sizeof *lat), lag = malloc((n + 1) * sizeof *lag);
    if (!lat || !lag) die("out of memory");
    rlat = malloc((n + 1) * sizeof *rlat), rstat = calloc(n + 1, sizeof *rstat);
    if (!rlat || !rstat) die("out of memory");
    for (long j = 0; j <= n; j++) rlat[j] = -1;
    prctl(PR_SET_TIMERSLACK, 1UL);    /* wake at the due time, not up to 50 us later */
    ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event tev = {.events = EPOLLIN, .data.ptr = NULL};
    if (ep < 0 || tfd < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev)) die("epoll/timerfd setup failed");

    int64_t began = now_ns(), armed = -1;
    start = began + 50000000;
    int64_t deadline = due(n ? n - 1 : 0) + DRAIN_NS;
    struct epoll_event evs[MAX_CONN + 1];
    for (;;) {
        dispatch();
        if (next_req == n && inflight == 0) break;
        int64_t t = now_ns();
        if (t >= deadline) {           /* drain timeout: whatever is unanswered or unsent is an error */
            errors += inflight + (n - next_req);
            break;
        }
        int64_t wake = next_lag < n ? due(next_lag) : deadline;  /* next request to notice, else the deadline */
        if (wake != armed) {
            struct itimerspec its = {.it_value = {wake / 1000000000LL, wake % 1000000000LL}};
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
            armed = wake;
        }
        int k = epoll_wait(ep, evs, MAX_CONN + 1, 1000);
        for (int e = 0; e < k; e++) {
            conn *c = evs[e].data.ptr;
            if (!c) {                  /* the timer: clear its expiry; the loop re-arms it */
                uint64_t x;
                if (read(tfd, &x, sizeof x) < 0 && errno != EAGAIN) die("timerfd read failed");
                armed = -1;
                continue;
            }
            if (c->state == FREE) continue;  /* closed earlier in this batch */
            if (c->state == CONNECTING) { if (evs[e].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) connected(c); continue; }
            if (evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) readable(c);
            if (c->state == BUSY && (evs[e].events & EPOLLOUT)) send_rest(c);
        }
    }
    double elapsed = (now_ns() - began) / 1e9;
    for (int j = 0; j < MAX_CONN; j++) if (conns[j].state != FREE) close(conns[j].fd);
    qsort(lat, nlat, sizeof *lat, cmp);
    qsort(lag, next_lag, sizeof *lag, cmp);
    char rs[64];                       /* the rate as Python's repr wrote it: fewest decimals that read back exactly */
    for (int d = 0; d <= 17; d++) if (snprintf(rs, sizeof rs - 2, "%.*f", d, rate), strtod(rs, NULL) == rate) break;
    if (!strchr(rs, '.')) strcat(rs, ".0");
    printf("{\"offered_rate\": %s, \"sent\": %ld, \"elapsed_s\": %.2f, \"ok2xx\": %ld, \"recorded\": %ld, "
           "\"other\": %ld, \"errors\": %ld, ", rs, n, elapsed, ok2xx, recorded, other, errors);
    ms("p50_ms", pct_ms(lat, nlat, 50), ", ");
    ms("p90_ms", pct_ms(lat, nlat, 90), ", ");
    ms("p99_ms", pct_ms(lat, nlat, 99), ", ");
    ms("max_ms", nlat ? lat[nlat - 1] / 1e6 : NAN, ", ");
    ms("generator_lag_p99_ms", pct_ms(lag, next_lag, 99), ", ");
    ms("generator_lag_max_ms", next_lag ? lag[next_lag - 1] / 1e6 : NAN, "}\n");
    const char *dump = getenv("OPENLOOP_DUMP");
    if (dump) {
        FILE *d = fopen(dump, "wb");
        int64_t head[2] = {start, n};
        if (!d || fwrite(head, sizeof head, 1, d) != 1 || fwrite(rlat, sizeof *rlat, n, d) != (size_t)n
            || fwrite(rstat, sizeof *rstat, n, d) != (size_t)n || fclose(d)) die("cannot write OPENLOOP_DUMP");
    }
    return 0;
}
