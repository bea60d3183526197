#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* 16384 x 16384 at 32 bpp is 2^30 bytes: with both sides capped, stride * height cannot wrap uint32_t. */
#define BMP_MAX_DIM 16384

struct bmp_header {
    uint32_t file_size;
    uint32_t data_offset;
    uint32_t width;   /* as read from the file by rd_le32: attacker-controlled */
    uint32_t height;
    uint16_t bpp;
    uint32_t compression;
};

#include "function.c"

/* Stand-in decoder: trusts the allocation and writes every row of the image (row size computed in 64 bits),
   as the caller of bmp_alloc_pixels does. */
static void decode_rows(const struct bmp_header *h, uint8_t *pixels)
{
    uint64_t stride = ((uint64_t)h->width * h->bpp + 31) / 32 * 4;

    for (uint64_t y = 0; y < h->height; y++)
        memset(pixels + y * stride, 0x5a, stride);
}

/* Allocate and decode; want_size 0 means the header must be rejected (NULL). */
static int run(uint32_t w, uint32_t hgt, uint16_t bpp, size_t want_size)
{
    struct bmp_header h = { .file_size = 0, .data_offset = 54, .width = w, .height = hgt, .bpp = bpp };
    size_t size = 12345;
    uint8_t *p = bmp_alloc_pixels(&h, &size);

    if (p == NULL) {
        if (want_size == 0)
            return 1;
        fprintf(stderr, "%ux%u@%u: NULL, expected %zu bytes\n", w, hgt, bpp, want_size);
        return 0;
    }
    if (want_size == 0) {
        /* a header that should be rejected was accepted: a buffer large enough for the whole image would be
           safe (it is not written, to keep the case fast); a smaller one is decoded and overflows */
        uint64_t need = (((uint64_t)w * bpp + 31) / 32 * 4) * hgt;

        if (size >= need) {
            free(p);
            return 1;
        }
        fprintf(stderr, "%ux%u@%u: %zu bytes for a %llu-byte image, decoding\n", w, hgt, bpp, size,
                (unsigned long long)need);
        decode_rows(&h, p);
        free(p);
        return 0;
    }
    decode_rows(&h, p);
    free(p);
    if (size != want_size) {
        fprintf(stderr, "%ux%u@%u: size %zu, expected %zu\n", w, hgt, bpp, size, want_size);
        return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    const char *c = argc > 1 ? argv[1] : "";
    int ok;

    if (strcmp(c, "huge_dimensions") == 0)
        ok = run(65536, 16385, 32, 0);          /* 262144 * 16385 wraps to 262144 */
    else if (strcmp(c, "gray8_row_padding") == 0)
        ok = run(3, 2, 8, 8);                   /* 3-byte rows padded to 4 */
    else if (strcmp(c, "rgb24") == 0)
        ok = run(5, 3, 24, 48);                 /* 15-byte rows padded to 16 */
    else if (strcmp(c, "rgba32") == 0)
        ok = run(7, 9, 32, 252);
    else if (strcmp(c, "max_dimension") == 0)
        ok = run(BMP_MAX_DIM, 1, 32, 65536);    /* the cap itself is allowed */
    else if (strcmp(c, "zero_dimension") == 0)
        ok = run(0, 10, 24, 0) && run(10, 0, 24, 0);
    else if (strcmp(c, "bad_bpp") == 0)
        ok = run(4, 4, 16, 0) && run(4, 4, 1, 0);
    else
        return 2;
    return ok ? 0 : 1;
}
