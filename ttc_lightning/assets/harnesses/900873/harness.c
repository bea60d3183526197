#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct relay {
    int use_syslog;
    FILE *out;
    int errors;         /* write failures counted */
};

struct log_msg {
    int priority;
    const char *timestamp;
    const char *tag;
    const char *text;
};

/* syslog stand-in: formats its arguments as syslog(3) would and keeps the last message */
static char syslog_line[4096];
static int syslog_priority = -1;
static int syslog_calls;

static void fake_syslog(int priority, const char *format, ...)
{
    va_list ap;

    va_start(ap, format);
    vsnprintf(syslog_line, sizeof(syslog_line), format, ap);
    va_end(ap);
    syslog_priority = priority;
    syslog_calls++;
}
#define syslog fake_syslog

#include "function.c"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "check failed: %s (line %d)\n", #c, __LINE__); return 1; } } while (0)

/* relay msg to an in-memory stream; returns what was written (free it) */
static char *relay_to_memory(struct log_msg *msg, int *errors)
{
    char *buf = NULL;
    size_t size = 0;
    struct relay r = {0, NULL, 0};

    r.out = open_memstream(&buf, &size);
    relay_message(&r, msg);
    fclose(r.out);
    *errors = r.errors;
    return buf;
}

static int percent_in_text(void)
{
    /* %% and %m take no argument, so even the vulnerable run is defined; they must come out literally */
    struct log_msg msg = {13, "Jan  1 00:00:00", "shop", NULL};
    struct relay r = {1, NULL, 0};
    char *out;
    int errors, stream_ok;

    msg.text = strdup("50%% off %m");
    out = relay_to_memory(&msg, &errors);
    relay_message(&r, &msg);
    free((char *)msg.text);
    fprintf(stderr, "stream: %ssyslog: %s\n", out, syslog_line);
    stream_ok = strcmp(out, "<13>Jan  1 00:00:00 shop: 50%% off %m\n") == 0;
    free(out);
    CHECK(stream_ok);
    CHECK(strcmp(syslog_line, "<13>Jan  1 00:00:00 shop: 50%% off %m") == 0);
    return 0;
}

static int stream_output(void)
{
    struct log_msg msg = {14, "Mar  3 12:34:56", "sshd", NULL};
    char *out;
    int errors;

    msg.text = strdup("session opened");
    out = relay_to_memory(&msg, &errors);
    CHECK(out != NULL && strcmp(out, "<14>Mar  3 12:34:56 sshd: session opened\n") == 0);
    CHECK(errors == 0);
    CHECK(syslog_calls == 0);
    free(out);
    free((char *)msg.text);
    return 0;
}

static int syslog_output(void)
{
    struct log_msg msg = {30, "Mar  3 12:34:56", "cron", NULL};
    struct relay r = {1, NULL, 0};

    msg.text = strdup("job done");
    relay_message(&r, &msg);   /* r.out is NULL: the syslog path must not touch it */
    CHECK(syslog_calls == 1);
    CHECK(syslog_priority == 30);
    CHECK(strcmp(syslog_line, "<30>Mar  3 12:34:56 cron: job done") == 0);
    CHECK(r.errors == 0);
    free((char *)msg.text);
    return 0;
}

static int long_text_truncated(void)
{
    struct log_msg msg = {13, "Jan  1 00:00:00", "app", NULL};
    char *text = malloc(2001);
    char *out;
    int errors;

    memset(text, 'x', 2000);
    text[2000] = '\0';
    msg.text = text;
    out = relay_to_memory(&msg, &errors);
    /* the line is cut to 1023 characters, then the newline */
    CHECK(out != NULL && strlen(out) == 1024);
    CHECK(strncmp(out, "<13>Jan  1 00:00:00 app: xxx", 28) == 0);
    CHECK(out[1022] == 'x' && out[1023] == '\n');
    CHECK(errors == 0);
    free(out);
    free(text);
    return 0;
}

static int header_too_long(void)
{
    struct log_msg msg = {13, "Jan  1 00:00:00", NULL, NULL};
    char *tag = malloc(1101);
    char *out;
    int errors;

    memset(tag, 't', 1100);
    tag[1100] = '\0';
    msg.tag = tag;
    msg.text = strdup("dropped");
    out = relay_to_memory(&msg, &errors);
    CHECK(out != NULL && out[0] == '\0');    /* nothing relayed */
    CHECK(errors == 0);
    free(out);
    free(tag);
    free((char *)msg.text);
    return 0;
}

static int write_error_counted(void)
{
    struct log_msg msg = {13, "Jan  1 00:00:00", "app", NULL};
    char backing[64] = "";
    struct relay r = {0, NULL, 0};

    r.out = fmemopen(backing, sizeof(backing), "r");   /* read-only: every write fails */
    msg.text = strdup("lost");
    relay_message(&r, &msg);
    CHECK(r.errors == 1);
    fclose(r.out);
    free((char *)msg.text);
    return 0;
}

static const struct { const char *name; int (*run)(void); } cases[] = {
    {"percent_in_text", percent_in_text},
    {"stream_output", stream_output},
    {"syslog_output", syslog_output},
    {"long_text_truncated", long_text_truncated},
    {"header_too_long", header_too_long},
    {"write_error_counted", write_error_counted},
};

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        if (strcmp(argv[1], cases[i].name) == 0)
            return cases[i].run();
    return 2;
}
