/* Harness for pktparse find_option (CVE-0000-0002, CWE-125). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* TCP option kinds (RFC 9293) */
#define OPT_END    0
#define OPT_NOP    1
#define OPT_MSS    2
#define OPT_WSCALE 3
#define OPT_SACKOK 4
#define OPT_TS     8

#include "function.c"

/* Runs find_option on a heap copy of exactly n bytes, so ASan sees any read past the options area.
 * Returns the result; *value_off is the value's offset into the options (-1 when unset). */
static int find_in(const uint8_t *src, size_t n, uint8_t kind, long *value_off, int *value_len)
{
    uint8_t *opts = malloc(n ? n : 1);
    memcpy(opts, src, n);
    const uint8_t *value = NULL;
    uint8_t vlen = 0xff;
    int rc = find_option(opts, n, kind, &value, &vlen);
    *value_off = value ? (long)(value - opts) : -1;
    *value_len = vlen;
    free(opts);
    return rc;
}

static int case_trailing_kind(void)
{
    /* options end with a kind byte and no length byte */
    const uint8_t o[] = {OPT_NOP, OPT_NOP, OPT_WSCALE};
    long off; int len;
    return !(find_in(o, sizeof o, OPT_MSS, &off, &len) == -1);
}

static int case_find_mss(void)
{
    const uint8_t o[] = {OPT_MSS, 4, 0x05, 0xb4, OPT_SACKOK, 2};
    long off; int len;
    int ok = find_in(o, sizeof o, OPT_MSS, &off, &len) == 0 && off == 2 && len == 2;
    ok = ok && find_in(o, sizeof o, OPT_SACKOK, &off, &len) == 0 && off == 6 && len == 0;
    return !ok;
}

static int case_skip_nops(void)
{
    const uint8_t o[] = {OPT_NOP, OPT_NOP, OPT_TS, 10, 1, 2, 3, 4, 5, 6, 7, 8, OPT_NOP, OPT_WSCALE, 3, 7};
    long off; int len;
    int ok = find_in(o, sizeof o, OPT_WSCALE, &off, &len) == 0 && off == 15 && len == 1;
    ok = ok && find_in(o, sizeof o, OPT_TS, &off, &len) == 0 && off == 4 && len == 8;
    return !ok;
}

static int case_stops_at_end(void)
{
    /* an option after END is not looked at */
    const uint8_t o[] = {OPT_NOP, OPT_END, OPT_MSS, 4, 0x05, 0xb4};
    long off; int len;
    return !(find_in(o, sizeof o, OPT_MSS, &off, &len) == -1 && off == -1);
}

static int case_not_found(void)
{
    const uint8_t o[] = {OPT_MSS, 4, 0x05, 0xb4, OPT_NOP, OPT_WSCALE, 3, 7};
    long off; int len;
    return !(find_in(o, sizeof o, OPT_TS, &off, &len) == -1 && off == -1);
}

static int case_bad_length(void)
{
    /* a length below 2 is malformed, even before the wanted option */
    const uint8_t o[] = {OPT_SACKOK, 1, OPT_MSS, 4, 0x05, 0xb4};
    long off; int len;
    return !(find_in(o, sizeof o, OPT_MSS, &off, &len) == -1 && off == -1);
}

static int case_overrunning_option(void)
{
    /* the MSS option claims 4 bytes, 3 are there */
    const uint8_t o[] = {OPT_NOP, OPT_MSS, 4, 0x05};
    long off; int len;
    return !(find_in(o, sizeof o, OPT_MSS, &off, &len) == -1 && off == -1);
}

int main(int argc, char **argv)
{
    static const struct { const char *name; int (*fn)(void); } cases[] = {
        {"trailing_kind", case_trailing_kind},
        {"find_mss", case_find_mss},
        {"skip_nops", case_skip_nops},
        {"stops_at_end", case_stops_at_end},
        {"not_found", case_not_found},
        {"bad_length", case_bad_length},
        {"overrunning_option", case_overrunning_option},
    };
    if (argc < 2)
        return 2;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (strcmp(argv[1], cases[i].name) == 0)
            return cases[i].fn();
    fprintf(stderr, "unknown case: %s\n", argv[1]);
    return 2;
}
