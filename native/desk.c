/* hostd._desk: the socket's desk (hostd/desk.py) on a thread that never takes the GIL.
 *
 * hostd/desk.py says what the desk does and holds its Python twin, `Desk`; this is the same
 * contract, in C. Why: the twin's thread needs the GIL for each of its ten system calls and
 * for every line between them, and while a restore keeps the loop and the workers busy each
 * of those waits its turn (the switch interval, or longer where other threads queue for it
 * too): 2.5-3.5 ms a status at the median and 20-26 ms at p99 during a cold small-file
 * restore on 2 cores. Here, a status costs what the kernel's scheduling costs, whatever the
 * loop and the workers do: 0.3-0.4 ms and 5-8 ms, against 0.3-0.5 ms and 2-4 ms for a
 * trivial server in a process of its own (bench/RESULTS.md).
 *
 * Desk(listener_fd, started, euid, hand_over_after, stale_after, fresh_wait, accept_pause,
 *      max_head, max_answer)
 *   start()        the thread: accepts on the listener (a non-blocking Unix stream socket
 *                  the caller keeps and closes), answers whole plain `GET /v1/status`
 *                  requests from the posted rendering, hands everything else over.
 *   post(doc, at)  the status as the loop rendered it: a JSON object (bytes), without
 *                  "uptime", "status_age" and "caller", which each answer appends; `at` its
 *                  time.monotonic().
 *   set_access(restore, publish, admin)  each class's [access] entries as (any, uids,
 *                  gids): `any` for "*". Root and `euid` may use every class.
 *   notify_fd      an eventfd, readable when take() has something.
 *   take()         [(kind, fd, answered)]: HAND_OVER (the loop serves fd from now; answered:
 *                  the desk answered a request on it before), RENDER (the desk waits up to
 *                  fresh_wait for a new post), FAILED (fd: the errno; the desk's thread
 *                  stopped and handed over every connection it held: the loop accepts from
 *                  now), PAUSED (fd: the errno; out of descriptors, accepting again after
 *                  accept_pause).
 *   asked_at()     the time.monotonic() of the last status the desk answered.
 *   answered, handed   counts.
 *   stop()         the thread stops; connections it held and had not handed over are
 *                  closed. What take() has not returned yet stays there.
 *
 * status_request(head) -> None | bool: the desk's reading of a request head (no blank line),
 * as hostd/desk.py's `_status_request`: None unless it is a `GET /v1/status` the desk
 * answers; else whether the connection stays open after the answer. Stricter in one way: a
 * head of more than MAX_HEADERS header lines is left to the loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/sockios.h>

#define STATUS "GET /v1/status"
#define STATUS_LEN 14
#define MAX_HEADERS 64
#define MAX_GROUPS 65536 /* NGROUPS_MAX */
#define EVENTS 64

enum { HAND_OVER = 0, RENDER = 1, FAILED = 2, PAUSED = 3 };
enum { C_RESTORE = 0, C_PUBLISH = 1, C_ADMIN = 2, CLASSES = 3 };
static const char *const CLASS_NAMES[CLASSES] = {"restore", "publish", "admin"};

/* -- reading a request head ----------------------------------------------------------------- */

static int tchar(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int vchar(unsigned char c) { return (c >= 0x21 && c <= 0x7e) || c >= 0x80; }

static int lower_eq(const char *a, size_t n, const char *lit) {
    size_t m = strlen(lit);
    if (n != m)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)a[i];
        if (c >= 'A' && c <= 'Z')
            c = (unsigned char)(c + 32);
        if (c != (unsigned char)lit[i])
            return 0;
    }
    return 1;
}

static const char *find_crlf(const char *p, const char *end) {
    for (; p + 1 < end; p++)
        if (p[0] == '\r' && p[1] == '\n')
            return p;
    return end;
}

/* The request line: `GET /v1/status(?:\?[\x21-\x7e]*)? HTTP/1\.([01])`. -1 if not; else
 * the minor version. */
static int request_line(const char *p, size_t n) {
    if (n < STATUS_LEN || memcmp(p, STATUS, STATUS_LEN) != 0)
        return -1;
    size_t i = STATUS_LEN;
    if (i < n && p[i] == '?')
        for (i++; i < n && p[i] >= 0x21 && p[i] <= 0x7e; i++)
            ;
    static const char tail[] = " HTTP/1.";
    if (n - i != sizeof tail || memcmp(p + i, tail, sizeof tail - 1) != 0)
        return -1;
    char v = p[n - 1];
    return v == '0' ? 0 : v == '1' ? 1 : -1;
}

/* One header line `name:[ \t]*value`; the name and the value (trailing blanks dropped).
 * 0 if it is not one. */
static int header_line(const char *p, size_t n, const char **name, size_t *name_n,
                       const char **value, size_t *value_n) {
    size_t i = 0;
    while (i < n && tchar((unsigned char)p[i]))
        i++;
    if (i == 0 || i == n || p[i] != ':')
        return 0;
    *name = p;
    *name_n = i;
    for (i++; i < n && (p[i] == ' ' || p[i] == '\t'); i++)
        ;
    size_t start = i;
    for (; i < n; i++)
        if (!vchar((unsigned char)p[i]) && p[i] != ' ' && p[i] != '\t')
            return 0;
    size_t end = n;
    while (end > start && (p[end - 1] == ' ' || p[end - 1] == '\t'))
        end--;
    *value = p + start;
    *value_n = end - start;
    return 1;
}

/* Whether a Connection value lists the token "close" (any case, blanks around tokens). */
static int says_close(const char *v, size_t n) {
    size_t i = 0;
    while (i <= n) {
        size_t j = i;
        while (j < n && v[j] != ',')
            j++;
        size_t a = i, b = j;
        while (a < b && (v[a] == ' ' || v[a] == '\t'))
            a++;
        while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t'))
            b--;
        if (lower_eq(v + a, b - a, "close"))
            return 1;
        i = j + 1;
    }
    return 0;
}

/* -1 (the loop's), else 1 (the connection stays open after the answer) or 0. */
static int status_request(const char *head, size_t n) {
    const char *end = head + n;
    const char *eol = find_crlf(head, end);
    int minor = request_line(head, (size_t)(eol - head));
    if (minor < 0)
        return -1;
    int keep = minor == 1; /* (an HTTP/1.0 connection closes after the answer) */
    int host = 0, count = 0;
    const char *seen[MAX_HEADERS];
    size_t seen_n[MAX_HEADERS];
    for (const char *p = eol; p < end;) {
        p += 2; /* past the CRLF */
        const char *line_end = find_crlf(p, end);
        const char *name, *value;
        size_t name_n, value_n;
        if (count == MAX_HEADERS)
            return -1;
        if (!header_line(p, (size_t)(line_end - p), &name, &name_n, &value, &value_n))
            return -1; /* malformed, or a bare CR or LF inside: the loop's parser says how */
        for (int k = 0; k < count; k++)
            if (seen_n[k] == name_n && strncasecmp(seen[k], name, name_n) == 0)
                return -1;
        seen[count] = name;
        seen_n[count++] = name_n;
        if (lower_eq(name, name_n, "content-length") && !(value_n == 1 && value[0] == '0'))
            return -1;
        if (lower_eq(name, name_n, "transfer-encoding") || lower_eq(name, name_n, "expect") ||
            lower_eq(name, name_n, "upgrade"))
            return -1;
        if (lower_eq(name, name_n, "connection") && says_close(value, value_n))
            keep = 0;
        host |= lower_eq(name, name_n, "host");
        p = line_end;
    }
    if (minor == 1 && !host)
        return -1; /* HTTP/1.1 without Host: aiohttp answers 400 */
    return keep;
}

/* -- the desk ------------------------------------------------------------------------------- */

struct access {
    int any;
    Py_ssize_t n_uids, n_gids;
    unsigned long *uids, *gids;
};

struct rec {
    int kind, fd, answered;
};

struct conn {
    double until; /* handed over then, unless its head is whole before */
    int prev, next; /* the held list, by fd, in order of `until` (-1: none) */
    unsigned char held, answered;
};

struct desk {
    /* set at construction, read-only after */
    int listener, wake, notify, epoll;
    double started, hand_over_after, stale_after, fresh_wait, accept_pause;
    unsigned long euid;
    size_t max_head, max_answer;

    pthread_t thread;
    int running;
    atomic_int stopping;
    atomic_long answered, handed;

    pthread_mutex_t lock; /* the rendering, the access lists, the records, asked_at */
    pthread_cond_t posted;
    char *doc;
    size_t doc_n;
    double doc_at;
    double asked_at;
    int render_asked;
    struct access access[CLASSES];
    struct rec *recs;
    size_t n_recs, cap_recs;

    /* the thread's own */
    struct conn *conns;
    int n_conns, first, last;
    char *buf, *out;
    size_t out_cap;
    gid_t *groups;
    int groups_cap;
};

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A record for take(); 0, or -1 out of memory (the caller's to handle). */
static int push(struct desk *d, int kind, int fd, int answered) {
    pthread_mutex_lock(&d->lock);
    if (d->n_recs == d->cap_recs) {
        size_t cap = d->cap_recs ? 2 * d->cap_recs : 64;
        struct rec *r = realloc(d->recs, cap * sizeof *r);
        if (r == NULL) {
            pthread_mutex_unlock(&d->lock);
            return -1;
        }
        d->recs = r;
        d->cap_recs = cap;
    }
    d->recs[d->n_recs++] = (struct rec){kind, fd, answered};
    pthread_mutex_unlock(&d->lock);
    uint64_t one = 1;
    ssize_t w = write(d->notify, &one, sizeof one);
    (void)w; /* (a full eventfd counter is readable already) */
    return 0;
}

static struct conn *conn_of(struct desk *d, int fd) {
    if (fd >= d->n_conns) {
        int n = d->n_conns ? d->n_conns : 256;
        while (n <= fd)
            n *= 2;
        struct conn *c = realloc(d->conns, (size_t)n * sizeof *c);
        if (c == NULL)
            return NULL;
        memset(c + d->n_conns, 0, (size_t)(n - d->n_conns) * sizeof *c);
        d->conns = c;
        d->n_conns = n;
    }
    return &d->conns[fd];
}

static void unlink_held(struct desk *d, int fd) {
    struct conn *c = &d->conns[fd];
    if (c->prev >= 0)
        d->conns[c->prev].next = c->next;
    else
        d->first = c->next;
    if (c->next >= 0)
        d->conns[c->next].prev = c->prev;
    else
        d->last = c->prev;
    c->held = 0;
}

/* Stop holding fd (before it is closed or handed over). */
static void let_go(struct desk *d, int fd) {
    if (fd >= d->n_conns)
        return;
    struct conn *c = &d->conns[fd];
    c->answered = 0;
    if (c->held) {
        unlink_held(d, fd);
        epoll_ctl(d->epoll, EPOLL_CTL_DEL, fd, NULL);
    }
}

static void close_conn(struct desk *d, int fd) {
    let_go(d, fd);
    close(fd);
}

static void hand_over(struct desk *d, int fd) {
    int answered = fd < d->n_conns && d->conns[fd].answered;
    let_go(d, fd);
    atomic_fetch_add(&d->handed, 1);
    if (push(d, HAND_OVER, fd, answered) < 0)
        close(fd);
}

/* Hold fd until its next request is whole, hand_over_after at most (watched edge-triggered:
 * a head that is not whole yet wakes the desk again only when more of it comes). */
static void hold(struct desk *d, int fd) {
    struct conn *c = conn_of(d, fd);
    if (c == NULL) {
        hand_over(d, fd);
        return;
    }
    if (c->held)
        unlink_held(d, fd);
    else {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.fd = fd};
        if (epoll_ctl(d->epoll, EPOLL_CTL_ADD, fd, &ev) < 0) { /* (out of memory, or watches) */
            hand_over(d, fd);
            return;
        }
    }
    c->until = mono() + d->hand_over_after; /* (never earlier than the last one's) */
    c->held = 1;
    c->next = -1;
    c->prev = d->last;
    if (d->last >= 0)
        d->conns[d->last].next = fd;
    else
        d->first = fd;
    d->last = fd;
}

static int allowed(const struct access *a, unsigned long uid, unsigned long gid,
                   const gid_t *groups, int n_groups) {
    if (a->any)
        return 1;
    for (Py_ssize_t i = 0; i < a->n_uids; i++)
        if (a->uids[i] == uid)
            return 1;
    for (Py_ssize_t i = 0; i < a->n_gids; i++) {
        if (a->gids[i] == gid)
            return 1;
        for (int k = 0; k < n_groups; k++)
            if (a->gids[i] == (unsigned long)groups[k])
                return 1;
    }
    return 0;
}

/* The caller's supplementary groups (SO_PEERGROUPS); their number, or -1. */
static int peer_groups(struct desk *d, int fd) {
    for (;;) {
        socklen_t len = (socklen_t)((size_t)d->groups_cap * sizeof(gid_t));
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, d->groups, &len) == 0)
            return (int)(len / sizeof(gid_t));
        if (errno == ENOPROTOOPT || errno == EOPNOTSUPP)
            return 0; /* a kernel before 4.13 */
        if (errno != ERANGE || d->groups_cap >= MAX_GROUPS)
            return -1;
        int cap = d->groups_cap * 4;
        gid_t *g = realloc(d->groups, (size_t)cap * sizeof *g);
        if (g == NULL)
            return -1;
        d->groups = g;
        d->groups_cap = cap;
    }
}

/* Append to the answer being built; 0, or -1 where it would pass max_answer. */
static int put(struct desk *d, size_t *at, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(d->out + *at, d->out_cap - *at, fmt, ap);
        va_end(ap);
        if (n < 0)
            return -1;
        if (*at + (size_t)n < d->out_cap) {
            *at += (size_t)n;
            return 0;
        }
        size_t need = *at + (size_t)n + 1, cap = 2 * d->out_cap;
        if (cap > d->max_answer + 512) /* (room for the head and the answer, never more) */
            cap = d->max_answer + 512;
        if (cap < need)
            cap = need;
        if (cap > d->max_answer + 512)
            return -1;
        char *o = realloc(d->out, cap);
        if (o == NULL)
            return -1;
        d->out = o;
        d->out_cap = cap;
    }
}

/* A float as Python's json writes round(x, 3): shortest digits, one after the point. */
static void fmt3(char *s, size_t n, double x) {
    snprintf(s, n, "%.3f", x);
    size_t k = strlen(s);
    while (k > 2 && s[k - 1] == '0' && s[k - 2] != '.')
        s[--k] = 0;
}

/* The whole response for this connection's caller into d->out; its length, or 0 where the
 * loop must answer: the caller cannot be told, or may not ask (the loop's 403 names why),
 * there is no rendering yet, or the answer is over max_answer. */
static size_t status_answer(struct desk *d, int fd, int keep) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
        return 0;
    int n_groups = peer_groups(d, fd);
    if (n_groups < 0)
        return 0;
    unsigned long uid = (unsigned long)cred.uid, gid = (unsigned long)cred.gid;
    int always = uid == 0 || uid == d->euid;
    int classes[CLASSES];
    size_t at = 0, body_at;
    char uptime[64], age[64];

    pthread_mutex_lock(&d->lock);
    for (int k = 0; k < CLASSES; k++)
        classes[k] = always || allowed(&d->access[k], uid, gid, d->groups, n_groups);
    if (!classes[C_RESTORE]) {
        pthread_mutex_unlock(&d->lock);
        return 0;
    }
    double now = mono();
    d->asked_at = now;
    if (now - d->doc_at > d->stale_after && !atomic_load(&d->stopping)) {
        double was = d->doc_at;
        int asked = 1;
        if (!d->render_asked) { /* (once until the next post) */
            d->render_asked = 1;
            pthread_mutex_unlock(&d->lock);
            asked = push(d, RENDER, -1, 0) == 0;
            pthread_mutex_lock(&d->lock);
            if (!asked && d->doc_at == was)
                d->render_asked = 0;
        }
        if (asked) {
            double until = now + d->fresh_wait;
            struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
            while (d->doc_at == was && !atomic_load(&d->stopping))
                if (pthread_cond_timedwait(&d->posted, &d->lock, &ts) == ETIMEDOUT)
                    break;
        }
    }
    if (d->doc_n <= 2 || d->doc_n > d->max_answer || d->doc[d->doc_n - 1] != '}') {
        pthread_mutex_unlock(&d->lock);
        return 0;
    }
    now = mono();
    fmt3(uptime, sizeof uptime, now - d->started);
    fmt3(age, sizeof age, now - d->doc_at);
    /* The head is written once the body's length is known: the body first, past room for
     * the head (`body_at`), then the head just before it. */
    body_at = 160;
    at = body_at;
    int err = put(d, &at, "%.*s, \"uptime\": %s, \"status_age\": %s, \"caller\": "
                          "{\"pid\": %d, \"uid\": %lu, \"gid\": %lu, \"groups\": [",
                  (int)(d->doc_n - 1), d->doc, uptime, age, (int)cred.pid, uid, gid);
    pthread_mutex_unlock(&d->lock);
    for (int k = 0; !err && k < n_groups; k++)
        err = put(d, &at, k ? ", %lu" : "%lu", (unsigned long)d->groups[k]);
    err = err || put(d, &at, "], \"classes\": [");
    for (int k = 0, first = 1; !err && k < CLASSES; k++)
        if (classes[k]) {
            err = put(d, &at, first ? "\"%s\"" : ", \"%s\"", CLASS_NAMES[k]);
            first = 0;
        }
    err = err || put(d, &at, "]}}");
    size_t body_n = at - body_at;
    if (err || body_n > d->max_answer)
        return 0;
    char head[160];
    int head_n = snprintf(head, sizeof head,
                          "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
                          "Content-Length: %zu\r\n%s\r\n",
                          body_n, keep ? "" : "Connection: close\r\n");
    if (head_n <= 0 || (size_t)head_n > body_at)
        return 0;
    memmove(d->out, head, (size_t)head_n);
    memmove(d->out + head_n, d->out + body_at, body_n);
    return (size_t)head_n + body_n;
}

/* Whether bytes sent on fd are still unread by its client (an earlier answer): the desk
 * then leaves the connection to the loop, which may wait for the client. */
static int queued(int fd) {
    int n = 0;
    return ioctl(fd, SIOCOUTQ, &n) < 0 || n > 0;
}

/* Answer a whole status request on fd, hand fd to the loop, or leave it held while its
 * head is not whole yet (and may still be a status request). */
static void serve(struct desk *d, int fd) {
    /* One byte past max_head: whether anything follows a head of max_head bytes. */
    ssize_t n = recv(fd, d->buf, d->max_head + 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            close_conn(d, fd);
        return;
    }
    if (n == 0) { /* closed: before asking anything, or after an answer */
        close_conn(d, fd);
        return;
    }
    size_t m = (size_t)n < STATUS_LEN ? (size_t)n : STATUS_LEN;
    if (memcmp(d->buf, STATUS, m) != 0) {
        hand_over(d, fd);
        return;
    }
    const char *end = memmem(d->buf, (size_t)n, "\r\n\r\n", 4);
    if (end == NULL || (size_t)(end - d->buf) + 4 > d->max_head) {
        if ((size_t)n >= d->max_head)
            hand_over(d, fd);
        return;
    }
    size_t head_n = (size_t)(end - d->buf);
    /* Bytes after the head (a pipelined request, a body): the loop's, with the head. */
    int keep = head_n + 4 == (size_t)n ? status_request(d->buf, head_n) : -1;
    size_t len = keep < 0 ? 0 : status_answer(d, fd, keep);
    if (len == 0 || queued(fd)) {
        hand_over(d, fd);
        return;
    }
    ssize_t sent = -1;
    if (recv(fd, d->buf, head_n + 4, MSG_DONTWAIT) == (ssize_t)(head_n + 4))
        sent = send(fd, d->out, len, MSG_DONTWAIT | MSG_NOSIGNAL); /* an empty buffer: all */
    if (sent != (ssize_t)len) {
        close_conn(d, fd);
        return;
    }
    atomic_fetch_add(&d->answered, 1);
    if (keep) {
        hold(d, fd); /* its next request has its own hand_over_after */
        if (fd < d->n_conns && d->conns[fd].held)
            d->conns[fd].answered = 1;
    } else
        close_conn(d, fd);
}

/* Accept what is queued: 0, when to accept again after running out of descriptors (the
 * queued connections wait in the backlog meanwhile), or -errno where accepting failed
 * otherwise. */
static double accept_all(struct desk *d) {
    for (;;) {
        int fd = accept4(d->listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN)
                return 0.0;
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                push(d, PAUSED, errno, 0);
                return mono() + d->accept_pause;
            }
            return -(double)errno;
        }
        hold(d, fd);
        if (fd < d->n_conns && d->conns[fd].held)
            serve(d, fd); /* (edge-triggered: what came before registering counts too) */
    }
}

static void *run(void *arg) {
    struct desk *d = arg;
    struct epoll_event evs[EVENTS];
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = d->listener};
    double resume = 0.0;
    int failed = 0;
    if (epoll_ctl(d->epoll, EPOLL_CTL_ADD, d->listener, &ev) < 0)
        failed = errno;
    while (!failed && !atomic_load(&d->stopping)) {
        double now = mono();
        if (resume > 0 && now >= resume) {
            if (epoll_ctl(d->epoll, EPOLL_CTL_ADD, d->listener, &ev) < 0) {
                failed = errno;
                break;
            }
            resume = 0.0;
        }
        double due = d->first >= 0 ? d->conns[d->first].until : 0.0;
        if (resume > 0 && (due == 0.0 || resume < due))
            due = resume;
        int timeout = due == 0.0 ? -1 : due <= now ? 0 : (int)((due - now) * 1000.0) + 1;
        int n = epoll_wait(d->epoll, evs, EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            failed = errno;
            break;
        }
        for (int i = 0; i < n && !failed; i++) {
            int fd = evs[i].data.fd;
            if (fd == d->wake)
                continue;
            if (fd == d->listener) {
                double r = accept_all(d);
                if (r < 0)
                    failed = (int)-r;
                else if (r > 0) {
                    resume = r;
                    epoll_ctl(d->epoll, EPOLL_CTL_DEL, d->listener, NULL);
                }
                continue;
            }
            if (fd < d->n_conns && d->conns[fd].held)
                serve(d, fd);
        }
        now = mono();
        while (d->first >= 0 && d->conns[d->first].until <= now)
            hand_over(d, d->first);
    }
    if (failed) {
        while (d->first >= 0)
            hand_over(d, d->first);
        push(d, FAILED, failed, 0);
    }
    while (d->first >= 0) /* stopping: what was neither answered nor handed over */
        close_conn(d, d->first);
    return NULL;
}

/* -- the Python type ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD struct desk *d;
} DeskObject;

static void free_access(struct access *a) {
    free(a->uids);
    free(a->gids);
    memset(a, 0, sizeof *a);
}

static void desk_free(struct desk *d) {
    if (d->wake >= 0)
        close(d->wake);
    if (d->notify >= 0)
        close(d->notify);
    if (d->epoll >= 0)
        close(d->epoll);
    for (int k = 0; k < CLASSES; k++)
        free_access(&d->access[k]);
    pthread_mutex_destroy(&d->lock);
    pthread_cond_destroy(&d->posted);
    free(d->doc);
    free(d->recs);
    free(d->conns);
    free(d->buf);
    free(d->out);
    free(d->groups);
    free(d);
}

static void stop_thread(struct desk *d) {
    if (!d->running)
        return;
    atomic_store(&d->stopping, 1);
    uint64_t one = 1;
    ssize_t w = write(d->wake, &one, sizeof one);
    (void)w;
    pthread_mutex_lock(&d->lock);
    pthread_cond_broadcast(&d->posted);
    pthread_mutex_unlock(&d->lock);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(d->thread, NULL);
    Py_END_ALLOW_THREADS
    d->running = 0;
}

static int Desk_init(DeskObject *self, PyObject *args, PyObject *kw) {
    (void)kw;
    int listener;
    unsigned long euid;
    double started, after, stale, fresh, pause;
    Py_ssize_t max_head, max_answer;
    if (self->d != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Desk is initialized already");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "idkddddnn", &listener, &started, &euid, &after, &stale,
                          &fresh, &pause, &max_head, &max_answer))
        return -1;
    if (max_head < 64 || max_answer < 64) {
        PyErr_SetString(PyExc_ValueError, "max_head and max_answer must be at least 64");
        return -1;
    }
    struct desk *d = calloc(1, sizeof *d);
    if (d == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    d->listener = listener;
    d->started = started;
    d->euid = euid;
    d->hand_over_after = after;
    d->stale_after = stale;
    d->fresh_wait = fresh;
    d->accept_pause = pause;
    d->max_head = (size_t)max_head;
    d->max_answer = (size_t)max_answer;
    d->first = d->last = -1;
    d->doc_at = -1e9;
    d->asked_at = -1e9;
    pthread_mutex_init(&d->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->posted, &ca);
    pthread_condattr_destroy(&ca);
    d->wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    d->notify = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    d->epoll = epoll_create1(EPOLL_CLOEXEC);
    d->buf = malloc(d->max_head + 1);
    d->out_cap = 4096;
    d->out = malloc(d->out_cap);
    d->groups_cap = 64;
    d->groups = malloc((size_t)d->groups_cap * sizeof(gid_t));
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = d->wake};
    if (d->wake < 0 || d->notify < 0 || d->epoll < 0 ||
        epoll_ctl(d->epoll, EPOLL_CTL_ADD, d->wake, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        desk_free(d);
        return -1;
    }
    if (d->buf == NULL || d->out == NULL || d->groups == NULL) {
        PyErr_NoMemory();
        desk_free(d);
        return -1;
    }
    self->d = d;
    return 0;
}

static void Desk_dealloc(DeskObject *self) {
    if (self->d != NULL) {
        stop_thread(self->d);
        desk_free(self->d);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static struct desk *desk_of(DeskObject *self) {
    if (self->d == NULL)
        PyErr_SetString(PyExc_RuntimeError, "Desk is not initialized");
    return self->d;
}

static PyObject *Desk_start(DeskObject *self, PyObject *noargs) {
    (void)noargs;
    struct desk *d = desk_of(self);
    if (d == NULL)
        return NULL;
    if (d->running || atomic_load(&d->stopping)) {
        PyErr_SetString(PyExc_RuntimeError, "the desk was started already");
        return NULL;
    }
    /* Signals go to the interpreter's threads, never to this one. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int e = pthread_create(&d->thread, NULL, run, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e != 0) {
        errno = e;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    d->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Desk_stop(DeskObject *self, PyObject *noargs) {
    (void)noargs;
    struct desk *d = desk_of(self);
    if (d == NULL)
        return NULL;
    stop_thread(d);
    atomic_store(&d->stopping, 1);
    Py_RETURN_NONE;
}

static PyObject *Desk_post(DeskObject *self, PyObject *args) {
    struct desk *d = desk_of(self);
    const char *doc;
    Py_ssize_t n;
    double at;
    if (d == NULL || !PyArg_ParseTuple(args, "y#d", &doc, &n, &at))
        return NULL;
    char *copy = malloc(n ? (size_t)n : 1);
    if (copy == NULL)
        return PyErr_NoMemory();
    memcpy(copy, doc, (size_t)n);
    pthread_mutex_lock(&d->lock);
    char *old = d->doc;
    d->doc = copy;
    d->doc_n = (size_t)n;
    d->doc_at = at;
    d->render_asked = 0;
    pthread_cond_broadcast(&d->posted);
    pthread_mutex_unlock(&d->lock);
    free(old);
    Py_RETURN_NONE;
}

static int ids_of(PyObject *seq, unsigned long **out, Py_ssize_t *n) {
    PyObject *fast = PySequence_Fast(seq, "uids and gids must be sequences of ints");
    if (fast == NULL)
        return -1;
    *n = PySequence_Fast_GET_SIZE(fast);
    *out = malloc((size_t)(*n ? *n : 1) * sizeof **out);
    if (*out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        (*out)[i] = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fast, i));
        if ((*out)[i] == (unsigned long)-1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            free(*out);
            *out = NULL;
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

static PyObject *Desk_set_access(DeskObject *self, PyObject *args) {
    struct desk *d = desk_of(self);
    PyObject *cls[CLASSES];
    if (d == NULL || !PyArg_ParseTuple(args, "OOO", &cls[0], &cls[1], &cls[2]))
        return NULL;
    struct access got[CLASSES];
    memset(got, 0, sizeof got);
    for (int k = 0; k < CLASSES; k++) {
        PyObject *uids, *gids;
        if (!PyArg_ParseTuple(cls[k], "pOO", &got[k].any, &uids, &gids) ||
            ids_of(uids, &got[k].uids, &got[k].n_uids) < 0 ||
            ids_of(gids, &got[k].gids, &got[k].n_gids) < 0) {
            for (int j = 0; j <= k; j++)
                free_access(&got[j]);
            return NULL;
        }
    }
    pthread_mutex_lock(&d->lock);
    struct access old[CLASSES];
    memcpy(old, d->access, sizeof old);
    memcpy(d->access, got, sizeof got);
    pthread_mutex_unlock(&d->lock);
    for (int k = 0; k < CLASSES; k++)
        free_access(&old[k]);
    Py_RETURN_NONE;
}

static PyObject *Desk_take(DeskObject *self, PyObject *noargs) {
    (void)noargs;
    struct desk *d = desk_of(self);
    if (d == NULL)
        return NULL;
    uint64_t count;
    ssize_t r = read(d->notify, &count, sizeof count); /* (EAGAIN: nothing new) */
    (void)r;
    pthread_mutex_lock(&d->lock);
    struct rec *recs = d->recs;
    size_t n = d->n_recs;
    d->recs = NULL;
    d->n_recs = d->cap_recs = 0;
    pthread_mutex_unlock(&d->lock);
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out != NULL && i < n; i++) {
        PyObject *t = Py_BuildValue("(iiO)", recs[i].kind, recs[i].fd,
                                    recs[i].answered ? Py_True : Py_False);
        if (t == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    if (out == NULL) /* (no answer: the connections handed over are closed) */
        for (size_t i = 0; i < n; i++)
            if (recs[i].kind == HAND_OVER)
                close(recs[i].fd);
    free(recs);
    return out;
}

static PyObject *Desk_asked_at(DeskObject *self, PyObject *noargs) {
    (void)noargs;
    struct desk *d = desk_of(self);
    if (d == NULL)
        return NULL;
    pthread_mutex_lock(&d->lock);
    double at = d->asked_at;
    pthread_mutex_unlock(&d->lock);
    return PyFloat_FromDouble(at);
}

static PyObject *Desk_get_notify_fd(DeskObject *self, void *closure) {
    (void)closure;
    struct desk *d = desk_of(self);
    return d == NULL ? NULL : PyLong_FromLong(d->notify);
}

static PyObject *Desk_get_answered(DeskObject *self, void *closure) {
    (void)closure;
    struct desk *d = desk_of(self);
    return d == NULL ? NULL : PyLong_FromLong(atomic_load(&d->answered));
}

static PyObject *Desk_get_handed(DeskObject *self, void *closure) {
    (void)closure;
    struct desk *d = desk_of(self);
    return d == NULL ? NULL : PyLong_FromLong(atomic_load(&d->handed));
}

static PyMethodDef Desk_methods[] = {
    {"start", (PyCFunction)Desk_start, METH_NOARGS, "Start the desk's thread."},
    {"stop", (PyCFunction)Desk_stop, METH_NOARGS,
     "Stop the thread (waiting for it without the GIL); connections it held are closed."},
    {"post", (PyCFunction)Desk_post, METH_VARARGS,
     "post(doc, at): the status the loop rendered (a JSON object, bytes) at time.monotonic() "
     "`at`."},
    {"set_access", (PyCFunction)Desk_set_access, METH_VARARGS,
     "set_access(restore, publish, admin): each class's entries as (any, uids, gids)."},
    {"take", (PyCFunction)Desk_take, METH_NOARGS,
     "take() -> [(kind, fd, answered)]: what the desk has for the loop (HAND_OVER, RENDER, "
     "FAILED)."},
    {"asked_at", (PyCFunction)Desk_asked_at, METH_NOARGS,
     "asked_at() -> the time.monotonic() of the last status asked of the desk."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Desk_getset[] = {
    {"notify_fd", (getter)Desk_get_notify_fd, NULL, "readable when take() has something", NULL},
    {"answered", (getter)Desk_get_answered, NULL, "status requests answered", NULL},
    {"handed", (getter)Desk_get_handed, NULL, "connections handed to the loop", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DeskType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hostd._desk.Desk",
    .tp_basicsize = sizeof(DeskObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The socket's desk on a thread of its own (see hostd/desk.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Desk_init,
    .tp_dealloc = (destructor)Desk_dealloc,
    .tp_methods = Desk_methods,
    .tp_getset = Desk_getset,
};

static PyObject *py_status_request(PyObject *self, PyObject *arg) {
    (void)self;
    char *head;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &head, &n) < 0)
        return NULL;
    int keep = status_request(head, (size_t)n);
    if (keep < 0)
        Py_RETURN_NONE;
    return PyBool_FromLong(keep);
}

static PyMethodDef methods[] = {
    {"status_request", py_status_request, METH_O,
     "status_request(head) -> None | bool: None unless the head (no blank line) is a "
     "`GET /v1/status` the desk answers; else whether its connection stays open after."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "hostd._desk",
    .m_doc = "The socket's desk on a thread that never takes the GIL (the twin is "
             "hostd/desk.py's Desk).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__desk(void) {
    if (PyType_Ready(&DeskType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&DeskType);
    if (PyModule_AddObject(m, "Desk", (PyObject *)&DeskType) < 0 ||
        PyModule_AddIntConstant(m, "HAND_OVER", HAND_OVER) < 0 ||
        PyModule_AddIntConstant(m, "RENDER", RENDER) < 0 ||
        PyModule_AddIntConstant(m, "FAILED", FAILED) < 0 ||
        PyModule_AddIntConstant(m, "PAUSED", PAUSED) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEADERS", MAX_HEADERS) < 0) {
        Py_DECREF(&DeskType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
