/* Harness for kvstore batch_decode (CVE-0000-0005, CWE-190). */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 16 bytes in memory (4 + 2 + pad 2 + 8): 0x10000001 items * 16 wraps to 16 in 32 bits. */
struct item {
    uint32_t key;
    uint16_t flags;
    uint64_t value;
};
_Static_assert(sizeof(struct item) == 16, "the proof's count relies on a 16-byte item");

/* on the wire: key (be32), flags (be16), value (be64) */
#define ITEM_WIRE_SIZE 14

static uint16_t read_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t read_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t read_be64(const uint8_t *p) { return (uint64_t)read_be32(p) << 32 | read_be32(p + 4); }

#include "function.c"

static void put_be32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

/* A heap buffer of exactly len bytes holding count, then n items with key 0x1000+i, flags i, value 0x100*i+7. */
static uint8_t *make_batch(uint32_t count, int n, size_t extra, size_t *len)
{
    *len = 4 + (size_t)n * ITEM_WIRE_SIZE + extra;
    uint8_t *b = calloc(1, *len);
    put_be32(b, count);
    for (int i = 0; i < n; i++) {
        uint8_t *p = b + 4 + i * ITEM_WIRE_SIZE;
        put_be32(p, 0x1000 + i);
        p[4] = 0; p[5] = (uint8_t)i;
        put_be32(p + 6, 0);
        put_be32(p + 10, 0x100 * i + 7);
    }
    return b;
}

static int case_huge_count(void)
{
    size_t len;
    uint8_t *b = make_batch(0x10000001u, 2, 0, &len);
    uint32_t n = 12345;
    struct item *items = batch_decode(b, len, &n);
    int ok = items == NULL && n == 12345;
    free(items);
    free(b);
    return !ok;
}

static int case_decode_two(void)
{
    size_t len;
    uint8_t *b = make_batch(2, 2, 0, &len);
    uint32_t n = 0;
    struct item *it = batch_decode(b, len, &n);
    int ok = it != NULL && n == 2 && it[0].key == 0x1000 && it[0].flags == 0 && it[0].value == 7 &&
             it[1].key == 0x1001 && it[1].flags == 1 && it[1].value == 0x107;
    free(it);
    free(b);
    return !ok;
}

static int case_decode_fields(void)
{
    /* big-endian decoding of every field, full width */
    const uint8_t src[4 + ITEM_WIRE_SIZE] = {0, 0, 0, 1,
                                             0xde, 0xad, 0xbe, 0xef, 0x80, 0x01,
                                             0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08};
    uint8_t *b = malloc(sizeof src);
    memcpy(b, src, sizeof src);
    uint32_t n = 0;
    struct item *it = batch_decode(b, sizeof src, &n);
    int ok = it != NULL && n == 1 && it[0].key == 0xdeadbeefu && it[0].flags == 0x8001 &&
             it[0].value == 0x0102030405060708ull;
    free(it);
    free(b);
    return !ok;
}

static int case_short_header(void)
{
    uint8_t *b = malloc(3);
    memset(b, 0, 3);
    uint32_t n = 99;
    struct item *it = batch_decode(b, 3, &n);
    int ok = it == NULL && n == 99;
    free(it);
    free(b);
    return !ok;
}

static int case_count_exceeds_data(void)
{
    /* says 3 items, carries 2 */
    size_t len;
    uint8_t *b = make_batch(3, 2, 5, &len);
    uint32_t n = 99;
    struct item *it = batch_decode(b, len, &n);
    int ok = it == NULL && n == 99;
    free(it);
    free(b);
    return !ok;
}

static int case_trailing_bytes(void)
{
    /* one item followed by bytes that are not a whole item: the count rules */
    size_t len;
    uint8_t *b = make_batch(1, 2, 0, &len);
    uint32_t n = 0;
    struct item *it = batch_decode(b, len - 3, &n);
    int ok = it != NULL && n == 1 && it[0].key == 0x1000 && it[0].value == 7;
    free(it);
    free(b);
    return !ok;
}

int main(int argc, char **argv)
{
    static const struct { const char *name; int (*fn)(void); } cases[] = {
        {"huge_count", case_huge_count},
        {"decode_two", case_decode_two},
        {"decode_fields", case_decode_fields},
        {"short_header", case_short_header},
        {"count_exceeds_data", case_count_exceeds_data},
        {"trailing_bytes", case_trailing_bytes},
    };
    if (argc < 2)
        return 2;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        if (strcmp(argv[1], cases[i].name) == 0)
            return cases[i].fn();
    fprintf(stderr, "unknown case: %s\n", argv[1]);
    return 2;
}
