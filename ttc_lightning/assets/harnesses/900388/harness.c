/* Harness for sessiond session_close (CVE-0000-0004, CWE-416). */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct list_head { struct list_head *next, *prev; };

static void list_init(struct list_head *h) { h->next = h->prev = h; }
static void list_add_tail(struct list_head *n, struct list_head *h)
{
    n->prev = h->prev;
    n->next = h;
    h->prev->next = n;
    h->prev = n;
}
static void list_del(struct list_head *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->next = n->prev = NULL;
}

struct buffer { char *data; size_t cap; };

static struct buffer *buffer_new(size_t cap)
{
    struct buffer *b = malloc(sizeof *b);
    b->data = malloc(cap);
    b->cap = cap;
    return b;
}
static void buffer_free(struct buffer *b)
{
    if (b == NULL)
        return;
    free(b->data);
    free(b);
}

/* A logger that keeps the last message; when disabled it drops messages (the arguments are still evaluated). */
struct logger { int enabled; int count; char last[128]; };

static void log_info(struct logger *log, const char *fmt, ...)
{
    va_list ap;
    if (!log->enabled)
        return;
    va_start(ap, fmt);
    vsnprintf(log->last, sizeof log->last, fmt, ap);
    va_end(ap);
    log->count++;
}

enum { CLOSE_EOF, CLOSE_TIMEOUT, CLOSE_ERROR };

static const char *close_reason_str(int reason)
{
    switch (reason) {
    case CLOSE_EOF: return "eof";
    case CLOSE_TIMEOUT: return "timeout";
    case CLOSE_ERROR: return "error";
    default: return "unknown";
    }
}

/* close() stand-in: records the descriptors closed, touches no real fd. */
static int closed_fds[8];
static int n_closed;
static int stub_close(int fd)
{
    if (n_closed < 8)
        closed_fds[n_closed] = fd;
    n_closed++;
    return 0;
}
#define close stub_close

struct server {
    struct list_head sessions;
    unsigned nsessions;
    struct logger *log;
};

struct session {
    struct list_head node;
    unsigned id;
    int fd;
    struct buffer *inbuf;
    struct buffer *outbuf;
};

#include "function.c"

static struct logger the_log;

static void server_init(struct server *srv, int logging)
{
    list_init(&srv->sessions);
    srv->nsessions = 0;
    memset(&the_log, 0, sizeof the_log);
    the_log.enabled = logging;
    srv->log = &the_log;
}

/* A heap-allocated session with heap buffers, as the daemon's accept path makes them. */
static struct session *session_open(struct server *srv, unsigned id, int fd)
{
    struct session *s = calloc(1, sizeof *s);
    s->id = id;
    s->fd = fd;
    s->inbuf = buffer_new(64);
    s->outbuf = buffer_new(64);
    list_add_tail(&s->node, &srv->sessions);
    srv->nsessions++;
    return s;
}

static void server_close_all(struct server *srv)
{
    while (srv->sessions.next != &srv->sessions) {
        struct session *s = (struct session *)((char *)srv->sessions.next - offsetof(struct session, node));
        list_del(&s->node);
        buffer_free(s->inbuf);
        buffer_free(s->outbuf);
        free(s);
    }
}

static int case_close_logged(void)
{
    struct server srv;
    server_init(&srv, 1);
    session_open(&srv, 3, 10);
    struct session *s = session_open(&srv, 7, 11);
    session_close(&srv, s, CLOSE_TIMEOUT);
    int ok = srv.nsessions == 1 && the_log.count == 1 &&
             strcmp(the_log.last, "session 7 closed (timeout), 1 active") == 0;
    server_close_all(&srv);
    return !ok;
}

static int case_unlinks_middle(void)
{
    struct server srv;
    server_init(&srv, 0);
    struct session *a = session_open(&srv, 1, 20);
    struct session *b = session_open(&srv, 2, 21);
    struct session *c = session_open(&srv, 3, 22);
    session_close(&srv, b, CLOSE_EOF);
    int ok = srv.nsessions == 2 && srv.sessions.next == &a->node && a->node.next == &c->node &&
             c->node.prev == &a->node && c->node.next == &srv.sessions && srv.sessions.prev == &c->node;
    server_close_all(&srv);
    return !ok;
}

static int case_closes_fd_once(void)
{
    struct server srv;
    server_init(&srv, 1);
    struct session *s = session_open(&srv, 4, 42);
    session_close(&srv, s, CLOSE_ERROR);
    int ok = n_closed == 1 && closed_fds[0] == 42 && srv.nsessions == 0 &&
             srv.sessions.next == &srv.sessions && srv.sessions.prev == &srv.sessions &&
             strcmp(the_log.last, "session 4 closed (error), 0 active") == 0;
    server_close_all(&srv);
    return !ok;
}

static int case_no_fd(void)
{
    /* a session whose descriptor is already gone (fd -1) is not closed again */
    struct server srv;
    server_init(&srv, 1);
    session_open(&srv, 1, 30);
    struct session *s = session_open(&srv, 9, -1);
    session_close(&srv, s, CLOSE_EOF);
    int ok = n_closed == 0 && srv.nsessions == 1 && strcmp(the_log.last, "session 9 closed (eof), 1 active") == 0;
    server_close_all(&srv);
    return !ok;
}

static int case_reason_strings(void)
{
    struct server srv;
    server_init(&srv, 1);
    static const char *want[] = {
        "session 100 closed (eof), 2 active",
        "session 101 closed (timeout), 1 active",
        "session 102 closed (error), 0 active",
    };
    struct session *s[3];
    for (int i = 0; i < 3; i++)
        s[i] = session_open(&srv, 100 + i, 50 + i);
    int ok = 1;
    for (int i = 0; i < 3; i++) {
        session_close(&srv, s[i], CLOSE_EOF + i);
        ok = ok && strcmp(the_log.last, want[i]) == 0;
    }
    ok = ok && the_log.count == 3 && n_closed == 3 && closed_fds[2] == 52;
    server_close_all(&srv);
    return !ok;
}

static int case_logging_off(void)
{
    struct server srv;
    server_init(&srv, 0);
    struct session *s = session_open(&srv, 5, 60);
    session_close(&srv, s, CLOSE_EOF);
    int ok = the_log.count == 0 && srv.nsessions == 0 && n_closed == 1 && srv.sessions.next == &srv.sessions;
    server_close_all(&srv);
    return !ok;
}

int main(int argc, char **argv)
{
    static const struct { const char *name; int (*fn)(void); } cases[] = {
        {"close_logged", case_close_logged},
        {"unlinks_middle", case_unlinks_middle},
        {"closes_fd_once", case_closes_fd_once},
        {"no_fd", case_no_fd},
        {"reason_strings", case_reason_strings},
        {"logging_off", case_logging_off},
    };
    if (argc < 2)
        return 2;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (strcmp(argv[1], cases[i].name) == 0)
            return cases[i].fn();
    fprintf(stderr, "unknown case: %s\n", argv[1]);
    return 2;
}
