#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE_SIZE 4096
#define PAGE_HEADER_SIZE 32   /* page bytes before the first record */
#define SLOT_DEAD 0x1

struct slot {               /* as stored on disk: untrusted */
    uint16_t offset;
    uint16_t length;
    uint16_t flags;
};

struct page_header {
    uint16_t nslots;
};

struct page {
    struct page_header hdr;
    struct slot *slots;     /* hdr.nslots entries */
    uint8_t *bytes;         /* PAGE_SIZE bytes on the heap */
};

struct slot_view {
    const uint8_t *data;
    uint16_t len;
    uint16_t flags;
};

#include "function.c"

/* A page whose bytes are i & 0xff at offset i, with the given slots. */
static struct page *page_new(const struct slot *slots, uint16_t n)
{
    struct page *pg = calloc(1, sizeof(*pg));

    pg->hdr.nslots = n;
    pg->slots = malloc(n * sizeof(*slots));
    memcpy(pg->slots, slots, n * sizeof(*slots));
    pg->bytes = malloc(PAGE_SIZE);
    for (int i = 0; i < PAGE_SIZE; i++)
        pg->bytes[i] = (uint8_t)i;
    return pg;
}

static void page_free(struct page *pg)
{
    free(pg->slots);
    free(pg->bytes);
    free(pg);
}

/* Read slot i and check the view: the record's bytes are read back as a caller would. */
static int expect_view(struct page *pg, unsigned int i, uint16_t off, uint16_t len, uint16_t flags)
{
    struct slot_view v = {0};
    int rc = page_read_slot(pg, i, &v);

    if (rc != 0 || v.data != pg->bytes + off || v.len != len || v.flags != flags) {
        fprintf(stderr, "slot %u: rc %d len %u flags %u\n", i, rc, v.len, v.flags);
        return 0;
    }
    for (uint16_t k = 0; k < v.len; k++)
        if (v.data[k] != (uint8_t)(off + k))
            return 0;
    return 1;
}

static int expect_eio(struct page *pg, unsigned int i)
{
    struct slot_view v = {0};
    int rc = page_read_slot(pg, i, &v);

    if (rc != -EIO) {
        fprintf(stderr, "slot %u: rc %d, expected -EIO\n", i, rc);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    const struct slot slots[] = {
        { 100, 20, 0 },                 /* 0: ordinary record */
        { 4000, 200, 0 },               /* 1: runs past the page (corrupt) */
        { PAGE_SIZE - 96, 96, 0 },      /* 2: ends exactly at the page end */
        { 200, 0, SLOT_DEAD },          /* 3: empty, dead */
        { 8, 16, 0 },                   /* 4: starts inside the page header (corrupt) */
    };
    struct page *pg = page_new(slots, 5);
    int ok;

    if (strcmp(c, "offset_past_page") == 0)
        ok = expect_eio(pg, 1);
    else if (strcmp(c, "read_slot") == 0)
        ok = expect_view(pg, 0, 100, 20, 0);
    else if (strcmp(c, "slot_ends_at_page_end") == 0)
        ok = expect_view(pg, 2, PAGE_SIZE - 96, 96, 0);
    else if (strcmp(c, "empty_slot_flags") == 0)
        ok = expect_view(pg, 3, 200, 0, SLOT_DEAD);
    else if (strcmp(c, "offset_inside_header") == 0)
        ok = expect_eio(pg, 4);
    else {
        page_free(pg);
        return 2;
    }
    page_free(pg);
    return ok ? 0 : 1;
}
