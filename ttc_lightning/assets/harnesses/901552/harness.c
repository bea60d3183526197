#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TIMER_PERIODIC 0x1

struct timer {
    uint64_t deadline;
    uint64_t interval;
    unsigned int flags;
    void (*callback)(void *arg);
    void *arg;
    struct timer *next, *prev;
};

struct timerq {
    struct timer *head;     /* sorted by deadline */
    unsigned int count;
};

/* The project's insert (same commit): keeps the list sorted, a timer going after those with an equal deadline. */
static void timerq_insert(struct timerq *q, struct timer *t)
{
    struct timer *cur = q->head, *prev = NULL;

    while (cur != NULL && cur->deadline <= t->deadline) {
        prev = cur;
        cur = cur->next;
    }
    t->prev = prev;
    t->next = cur;
    if (cur != NULL)
        cur->prev = t;
    if (prev != NULL)
        prev->next = t;
    else
        q->head = t;
    q->count++;
}

#include "function.c"

/* Callbacks append their (string) argument to a log. */
static char fired[64];

static void log_cb(void *arg)
{
    strcat(fired, (const char *)arg);
}

/* One-shot timers are owned by the queue (freed by timerq_expire); periodic ones stay in it. */
static struct timer *add(struct timerq *q, uint64_t deadline, uint64_t interval, const char *name)
{
    struct timer *t = calloc(1, sizeof(*t));

    t->deadline = deadline;
    t->interval = interval;
    t->flags = interval ? TIMER_PERIODIC : 0;
    t->callback = log_cb;
    t->arg = (void *)name;
    timerq_insert(q, t);
    return t;
}

/* Check the log, the count and the queue's deadlines (head first, prev links consistent); free the queue. */
static int check(struct timerq *q, const char *want_fired, unsigned int want_count, const uint64_t *deadlines)
{
    int ok = strcmp(fired, want_fired) == 0 && q->count == want_count;
    struct timer *t = q->head, *prev = NULL;
    unsigned int n = 0;

    if (!ok)
        fprintf(stderr, "fired \"%s\" count %u, expected \"%s\" %u\n", fired, q->count, want_fired, want_count);
    while (t != NULL) {
        struct timer *next = t->next;

        if (n >= want_count || t->deadline != deadlines[n] || t->prev != prev) {
            fprintf(stderr, "queue entry %u: deadline %llu\n", n, (unsigned long long)t->deadline);
            ok = 0;
        }
        n++;
        prev = t;
        free(t);
        t = next;
    }
    return ok && n == want_count;
}

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    struct timerq q = {0};

    if (strcmp(c, "oneshot_expires") == 0) {
        add(&q, 10, 0, "a");
        timerq_expire(&q, 10);
        return check(&q, "a", 0, NULL) ? 0 : 1;
    } else if (strcmp(c, "not_yet_due") == 0) {
        add(&q, 10, 0, "a");
        add(&q, 20, 0, "b");
        timerq_expire(&q, 9);
        return check(&q, "", 2, (const uint64_t[]){ 10, 20 }) ? 0 : 1;
    } else if (strcmp(c, "expire_in_order") == 0) {
        add(&q, 30, 0, "c");
        add(&q, 10, 0, "a");
        add(&q, 20, 0, "b");
        timerq_expire(&q, 100);
        return check(&q, "abc", 0, NULL) ? 0 : 1;
    } else if (strcmp(c, "partial_expiry") == 0) {
        add(&q, 10, 0, "a");
        add(&q, 20, 0, "b");
        add(&q, 30, 0, "c");
        add(&q, 40, 0, "d");
        timerq_expire(&q, 20);
        return check(&q, "ab", 2, (const uint64_t[]){ 30, 40 }) ? 0 : 1;
    } else if (strcmp(c, "periodic_rearms") == 0) {
        /* fires once at 50 and is re-queued for 50 + 25, after the timer due at 60 */
        add(&q, 50, 25, "p");
        add(&q, 60, 0, "x");
        timerq_expire(&q, 50);
        return check(&q, "p", 2, (const uint64_t[]){ 60, 75 }) ? 0 : 1;
    } else if (strcmp(c, "periodic_and_oneshot") == 0) {
        /* both due at 100: the periodic one fires, is re-queued for 130, then the one-shot fires */
        add(&q, 90, 30, "p");
        add(&q, 95, 0, "o");
        timerq_expire(&q, 100);
        return check(&q, "po", 1, (const uint64_t[]){ 130 }) ? 0 : 1;
    }
    return 2;
}
