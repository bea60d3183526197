/* Harness for tinytlv tlv_read_string (CVE-0000-0001, CWE-787). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Status codes and type byte: arbitrary distinct values; the function only compares with them. */
#define TLV_OK            0
#define TLV_ERR_SHORT    (-1)
#define TLV_ERR_TYPE     (-2)
#define TLV_ERR_TOO_LONG (-3)
#define TLV_TYPE_STRING  0x0c
#define TLV_TYPE_INT     0x02

#include "function.c"

/* Copies the record into a heap buffer of exactly its size, so ASan sees reads past its end. */
static uint8_t *heap_copy(const uint8_t *src, size_t n)
{
    uint8_t *p = malloc(n ? n : 1);
    memcpy(p, src, n);
    return p;
}

/* Reads one record at *offset into a fresh heap buffer of out_size bytes; returns the status. */
static int read_into(const uint8_t *rec, size_t rec_len, size_t *offset, size_t out_size, char *copy_out)
{
    uint8_t *buf = heap_copy(rec, rec_len);
    char *out = malloc(out_size);
    memset(out, 'X', out_size);
    int rc = tlv_read_string(buf, rec_len, offset, out, out_size);
    if (copy_out)
        memcpy(copy_out, out, out_size);
    free(out);
    free(buf);
    return rc;
}

static int case_long_value(void)
{
    /* 20-byte value, 8-byte output buffer */
    uint8_t rec[3 + 20] = {TLV_TYPE_STRING, 0x00, 20};
    memset(rec + 3, 'A', 20);
    size_t off = 0;
    int rc = read_into(rec, sizeof rec, &off, 8, NULL);
    return !(rc == TLV_ERR_TOO_LONG && off == 0);
}

static int case_short_value(void)
{
    const uint8_t rec[] = {TLV_TYPE_STRING, 0x00, 0x02, 'h', 'i'};
    size_t off = 0;
    char out[16];
    int rc = read_into(rec, sizeof rec, &off, sizeof out, out);
    return !(rc == TLV_OK && off == 5 && strcmp(out, "hi") == 0);
}

static int case_exact_fit(void)
{
    /* 7 characters plus the terminator fill an 8-byte buffer exactly */
    const uint8_t rec[] = {TLV_TYPE_STRING, 0x00, 0x07, 'a', 'b', 'c', 'd', 'e', 'f', 'g'};
    size_t off = 0;
    char out[8];
    int rc = read_into(rec, sizeof rec, &off, sizeof out, out);
    return !(rc == TLV_OK && off == 10 && memcmp(out, "abcdefg", 8) == 0);
}

static int case_two_records(void)
{
    /* the offset advances past the first record to the second one */
    const uint8_t rec[] = {TLV_TYPE_STRING, 0x00, 0x03, 'o', 'n', 'e',
                           TLV_TYPE_STRING, 0x00, 0x04, 't', 'w', 'o', '!'};
    uint8_t *buf = heap_copy(rec, sizeof rec);
    char *out = malloc(16);
    size_t off = 0;
    int ok = tlv_read_string(buf, sizeof rec, &off, out, 16) == TLV_OK && off == 6 && strcmp(out, "one") == 0;
    ok = ok && tlv_read_string(buf, sizeof rec, &off, out, 16) == TLV_OK && off == 13 && strcmp(out, "two!") == 0;
    ok = ok && tlv_read_string(buf, sizeof rec, &off, out, 16) == TLV_ERR_SHORT && off == 13;
    free(out);
    free(buf);
    return !ok;
}

static int case_truncated(void)
{
    /* declares 10 bytes, carries 4; and a header cut short */
    const uint8_t rec[] = {TLV_TYPE_STRING, 0x00, 0x0a, 'a', 'b', 'c', 'd'};
    size_t off = 0;
    int ok = read_into(rec, sizeof rec, &off, 32, NULL) == TLV_ERR_SHORT && off == 0;
    ok = ok && read_into(rec, 2, &off, 32, NULL) == TLV_ERR_SHORT && off == 0;
    return !ok;
}

static int case_wrong_type(void)
{
    const uint8_t rec[] = {TLV_TYPE_INT, 0x00, 0x02, 0x12, 0x34};
    size_t off = 0;
    int rc = read_into(rec, sizeof rec, &off, 16, NULL);
    return !(rc == TLV_ERR_TYPE && off == 0);
}

int main(int argc, char **argv)
{
    static const struct { const char *name; int (*fn)(void); } cases[] = {
        {"long_value", case_long_value},
        {"short_value", case_short_value},
        {"exact_fit", case_exact_fit},
        {"two_records", case_two_records},
        {"truncated", case_truncated},
        {"wrong_type", case_wrong_type},
    };
    if (argc < 2)
        return 2;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (strcmp(argv[1], cases[i].name) == 0)
            return cases[i].fn();
    fprintf(stderr, "unknown case: %s\n", argv[1]);
    return 2;
}
