#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DNS_MAX_POINTERS 16     /* compression pointers followed before a name is rejected */

#include "function.c"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "check failed: %s (line %d)\n", #c, __LINE__); return 1; } } while (0)

/* a message of exactly n bytes on the heap: a zeroed 12-byte header, then body */
static uint8_t *message(const char *body, size_t body_len, size_t *n)
{
    uint8_t *m = calloc(1, 12 + body_len);
    memcpy(m + 12, body, body_len);
    *n = 12 + body_len;
    return m;
}

static int skip(const char *body, size_t body_len, size_t offset)
{
    size_t n;
    uint8_t *m = message(body, body_len, &n);
    int rc = dns_skip_name(m, n, offset);
    free(m);
    return rc;
}

static int self_pointer(void)
{
    CHECK(skip("\xC0\x0C", 2, 12) == -1);
    return 0;
}

static int plain_name(void)
{
    /* www.example.com, then qtype and qclass */
    static const char body[] = "\3www\7example\3com\0\0\1\0\1";
    CHECK(skip(body, sizeof(body) - 1, 12) == 12 + 17);
    return 0;
}

static int compressed_name(void)
{
    /* example.com at 12; www + pointer to 12 at 25 */
    static const char body[] = "\7example\3com\0" "\3www\xC0\x0C";
    CHECK(skip(body, sizeof(body) - 1, 12) == 25);
    CHECK(skip(body, sizeof(body) - 1, 25) == 25 + 6);
    return 0;
}

static int pointer_chain(void)
{
    /* com at 12; pointer at 17 -> 12; pointer at 19 -> 17; label a + pointer at 21 -> 19 */
    static const char body[] = "\3com\0" "\xC0\x0C" "\xC0\x11" "\1a\xC0\x13";
    CHECK(skip(body, sizeof(body) - 1, 19) == 21);
    CHECK(skip(body, sizeof(body) - 1, 21) == 21 + 4);
    return 0;
}

static int truncated_label(void)
{
    static const char body[] = "\7exam";
    CHECK(skip(body, sizeof(body) - 1, 12) == -1);
    return 0;
}

static int pointer_out_of_range(void)
{
    static const char body[] = "\3www\xC1\x00";
    CHECK(skip(body, sizeof(body) - 1, 12) == -1);
    return 0;
}

static int cut_pointer(void)
{
    static const char body[] = "\3www\xC0";
    CHECK(skip(body, sizeof(body) - 1, 12) == -1);
    return 0;
}

static const struct { const char *name; int (*run)(void); } cases[] = {
    {"self_pointer", self_pointer},
    {"plain_name", plain_name},
    {"compressed_name", compressed_name},
    {"pointer_chain", pointer_chain},
    {"truncated_label", truncated_label},
    {"pointer_out_of_range", pointer_out_of_range},
    {"cut_pointer", cut_pointer},
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
