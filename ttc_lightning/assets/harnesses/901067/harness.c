#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HTTP_BAD_REQUEST 400
#define HTTP_INTERNAL_ERROR 500

struct http_request {
    char *host;     /* owned: the caller frees it */
    int port;
};

/* decimal port 1..65535, -1 for anything else */
static int parse_port(const char *s)
{
    long v = 0;

    if (*s == '\0')
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (*s - '0');
        if (v > 65535)
            return -1;
    }
    return v == 0 ? -1 : (int)v;
}

#include "function.c"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "check failed: %s (line %d)\n", #c, __LINE__); return 1; } } while (0)

/* parse a header value given as a heap string; req starts with no host and the default port 80 */
static int parse(struct http_request *req, const char *value)
{
    char *copy = strdup(value);
    int rc;

    req->host = NULL;
    req->port = 80;
    rc = http_parse_host(req, copy);
    free(copy);
    return rc;
}

static char *repeat(char c, size_t n)
{
    char *s = malloc(n + 1);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

static int long_host(void)
{
    struct http_request req;
    char *value = repeat('a', 400);
    int rc = parse(&req, value);

    free(value);
    free(req.host);
    CHECK(rc == HTTP_BAD_REQUEST);
    return 0;
}

static int host_only(void)
{
    struct http_request req;
    int ok;

    CHECK(parse(&req, "example.com") == 0);
    CHECK(req.host != NULL);
    ok = strcmp(req.host, "example.com") == 0 && req.port == 80;
    free(req.host);
    CHECK(ok);
    return 0;
}

static int host_and_port(void)
{
    struct http_request req;
    int ok;

    CHECK(parse(&req, " \tapi.example.org:8080") == 0);
    CHECK(req.host != NULL);
    ok = strcmp(req.host, "api.example.org") == 0 && req.port == 8080;
    free(req.host);
    CHECK(ok);
    return 0;
}

static int longest_host(void)
{
    struct http_request req;
    char *value = repeat('h', 255);
    int rc = parse(&req, value);
    int ok = rc == 0 && req.host != NULL && strcmp(req.host, value) == 0;

    free(value);
    free(req.host);
    CHECK(ok);
    return 0;
}

static int bad_port(void)
{
    struct http_request req;
    int rc = parse(&req, "example.com:http");

    free(req.host);
    CHECK(rc == HTTP_BAD_REQUEST);
    return 0;
}

static int empty_host(void)
{
    struct http_request req;
    int rc = parse(&req, "  :8080");

    free(req.host);
    CHECK(rc == HTTP_BAD_REQUEST);
    CHECK(req.host == NULL);
    return 0;
}

static const struct { const char *name; int (*run)(void); } cases[] = {
    {"long_host", long_host},
    {"host_only", host_only},
    {"host_and_port", host_and_port},
    {"longest_host", longest_host},
    {"bad_port", bad_port},
    {"empty_host", empty_host},
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
