#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INDEX_MAGIC 0x58444e49u     /* "INDX" little-endian */
#define INDEX_HDR_SIZE 12           /* magic, nbuckets, seed */
#define INDEX_ROOT_KEY "__root__"

struct index {
    uint32_t nbuckets;
    uint32_t seed;
    uint32_t root_bucket;
    uint32_t *buckets;              /* nbuckets heads, 0 = empty */
};

static uint32_t rd_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The project's hash (same commit). */
static uint32_t hash32(const char *key, uint32_t seed)
{
    uint32_t h = 2166136261u ^ seed;

    while (*key != '\0') {
        h ^= (uint8_t)*key++;
        h *= 16777619u;
    }
    h ^= h >> 15;
    h *= 0x2c1b3c6du;
    h ^= h >> 12;
    return h;
}

#include "function.c"

static void wr_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Open an index from a heap header of hdr_len bytes (exactly sized, so over-reads are seen). */
static int open_hdr(struct index *ix, uint32_t magic, uint32_t nbuckets, uint32_t seed, size_t hdr_len)
{
    uint8_t full[INDEX_HDR_SIZE];
    uint8_t *hdr = malloc(hdr_len ? hdr_len : 1);
    int rc;

    wr_le32(full, magic);
    wr_le32(full + 4, nbuckets);
    wr_le32(full + 8, seed);
    memcpy(hdr, full, hdr_len < sizeof(full) ? hdr_len : sizeof(full));
    rc = index_open(ix, hdr, hdr_len);
    free(hdr);
    return rc;
}

/* A successful open: fields from the header, root bucket from the seeded hash, zeroed buckets. */
static int expect_open(uint32_t nbuckets, uint32_t seed)
{
    struct index ix = {0};
    int rc = open_hdr(&ix, INDEX_MAGIC, nbuckets, seed, INDEX_HDR_SIZE);
    int ok = rc == 0 && ix.nbuckets == nbuckets && ix.seed == seed && ix.buckets != NULL &&
             ix.root_bucket == hash32(INDEX_ROOT_KEY, seed) % nbuckets;

    for (uint32_t i = 0; ok && i < nbuckets; i++)
        ok = ix.buckets[i] == 0;
    if (!ok)
        fprintf(stderr, "index_open(%u buckets) = %d: nbuckets %u seed %u root %u\n", nbuckets, rc, ix.nbuckets,
                ix.seed, ix.root_bucket);
    free(ix.buckets);
    return ok;
}

static int expect_einval(uint32_t magic, uint32_t nbuckets, size_t hdr_len)
{
    struct index ix = {0};
    int rc = open_hdr(&ix, magic, nbuckets, 7, hdr_len);

    free(ix.buckets);
    if (rc != -EINVAL) {
        fprintf(stderr, "index_open = %d, expected -EINVAL\n", rc);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    int ok;

    if (strcmp(c, "zero_buckets") == 0)
        ok = expect_einval(INDEX_MAGIC, 0, INDEX_HDR_SIZE);
    else if (strcmp(c, "open_index") == 0)
        ok = expect_open(97, 0x1234abcd) && expect_open(1024, 42);
    else if (strcmp(c, "one_bucket") == 0)
        ok = expect_open(1, 99);
    else if (strcmp(c, "bad_magic") == 0)
        ok = expect_einval(0x58444e4au, 16, INDEX_HDR_SIZE);
    else if (strcmp(c, "short_header") == 0)
        ok = expect_einval(INDEX_MAGIC, 16, INDEX_HDR_SIZE - 1);
    else
        return 2;
    return ok ? 0 : 1;
}
