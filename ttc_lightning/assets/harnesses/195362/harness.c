/* Harness for contiki-ng snmp_ber_decode_string_len_buffer (CVE-2020-12141).
 *
 * The vulnerable record uses the pre-4.5 API
 *   unsigned char *f(unsigned char *buf, uint32_t *buff_len, const char **str, uint32_t *length)
 * and the fix refactored it to
 *   int f(snmp_packet_t *snmp_packet, const char **str, uint32_t *length)
 * The records omit the return type (it sits on the line above the name), so the harness supplies
 * one that both bodies can return through: _Bool (NULL / 0 = failure, a pointer / 1 = success).
 * The name is a macro that picks, by argument count, one of two names, so either signature
 * compiles; the driver calls whichever was defined (both are declared weak). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC diagnostic ignored "-Waddress"      /* `if (weak_function)` and `return ptr;` into _Bool */

#define BER_DATA_TYPE_OCTET_STRING 0x04

/* os/net/app-layer/snmp/snmp.h after the refactor */
typedef struct {
  uint16_t used;
  uint16_t max;
  uint8_t *in;
  uint8_t *out;
} snmp_packet_t;

/* snmp_ber_decode_type, old API (buffer + remaining length) */
static __attribute__((unused)) unsigned char *
decode_type_old_api(unsigned char *buff, uint32_t *buff_len, uint8_t *type)
{
  if(*buff_len == 0) {
    return NULL;
  }
  *type = *buff++;
  (*buff_len)--;
  return buff;
}

/* snmp_ber_decode_type, new API (packet) */
static __attribute__((unused)) int
decode_type_new_api(snmp_packet_t *snmp_packet, uint8_t *type)
{
  if(snmp_packet->used == 0) {
    return 0;
  }
  *type = *snmp_packet->in++;
  snmp_packet->used--;
  return 1;
}

#define SBD_PICK4(_1, _2, _3, _4, NAME, ...) NAME
#define SBD_PICK3(_1, _2, _3, NAME, ...) NAME
#define snmp_ber_decode_type(...) \
  SBD_PICK3(__VA_ARGS__, decode_type_old_api, decode_type_new_api, sbd_bad_arity)(__VA_ARGS__)
#define snmp_ber_decode_string_len_buffer(...) \
  SBD_PICK4(__VA_ARGS__, decode_string_old_api, decode_string_new_api, sbd_bad_arity, sbd_bad_arity)(__VA_ARGS__)

__attribute__((weak)) _Bool decode_string_old_api(unsigned char *buf, uint32_t *buff_len,
                                                  const char **str, uint32_t *length);
__attribute__((weak)) _Bool decode_string_new_api(snmp_packet_t *snmp_packet, const char **str,
                                                  uint32_t *length);

_Bool
#include "function.c"

/* ---- driver ---------------------------------------------------------------------------------- */

typedef struct {
  int ok;                 /* the function reported success */
  const char *str;        /* *str */
  uint32_t length;        /* *length */
  uint32_t consumed;      /* bytes the caller's cursor advanced by */
} result_t;

/* Decodes `n` bytes copied into a heap buffer of exactly `n` bytes (so ASan sees any read past
 * the packet). `*base` gets the buffer so the caller can check `str`; the caller frees it. */
static result_t run(const unsigned char *bytes, size_t n, unsigned char **base)
{
  result_t r = {0, NULL, 0xdeadbeefu, 0};
  unsigned char *buf = malloc(n ? n : 1);
  memcpy(buf, bytes, n);
  *base = buf;
  if(decode_string_new_api) {
    snmp_packet_t pkt = { (uint16_t)n, (uint16_t)n, buf, NULL };
    r.ok = decode_string_new_api(&pkt, &r.str, &r.length);
    r.consumed = (uint32_t)(n - pkt.used);
  } else if(decode_string_old_api) {
    uint32_t len = (uint32_t)n;
    r.ok = decode_string_old_api(buf, &len, &r.str, &r.length);
    r.consumed = (uint32_t)n - len;
  } else {
    fprintf(stderr, "no decoder defined\n");
    exit(3);
  }
  return r;
}

static int expect_string(const unsigned char *bytes, size_t n, size_t header, const char *want)
{
  unsigned char *base;
  result_t r = run(bytes, n, &base);
  size_t wl = strlen(want);
  int good = r.ok && r.length == wl && r.str == (const char *)base + header
             && memcmp(r.str, want, wl) == 0 && r.consumed == header + wl;
  if(!good)
    fprintf(stderr, "ok=%d length=%u consumed=%u\n", r.ok, r.length, r.consumed);
  free(base);
  return good ? 0 : 1;
}

static int expect_failure(const unsigned char *bytes, size_t n)
{
  unsigned char *base;
  result_t r = run(bytes, n, &base);
  free(base);
  if(r.ok)
    fprintf(stderr, "decoder accepted a malformed string\n");
  return r.ok ? 1 : 0;
}

int main(int argc, char **argv)
{
  if(argc < 2) return 2;
  const char *c = argv[1];

  if(!strcmp(c, "truncated_long_length")) {
    /* OCTET STRING whose long-form length says 2 length bytes, but the packet ends after 1 */
    static const unsigned char m[] = { 0x04, 0x82, 0x01 };
    return expect_failure(m, sizeof m);
  }
  if(!strcmp(c, "short_form")) {
    /* 04 05 "hello", followed by the next element's type byte */
    static const unsigned char m[] = { 0x04, 0x05, 'h', 'e', 'l', 'l', 'o', 0x02 };
    return expect_string(m, sizeof m, 2, "hello");
  }
  if(!strcmp(c, "long_form")) {
    static const unsigned char m1[] = { 0x04, 0x81, 0x03, 'a', 'b', 'c', 0x30 };
    static const unsigned char m2[] = { 0x04, 0x82, 0x00, 0x04, 'w', 'x', 'y', 'z', 0x00 };
    return expect_string(m1, sizeof m1, 3, "abc") | expect_string(m2, sizeof m2, 4, "wxyz");
  }
  if(!strcmp(c, "wrong_type")) {
    static const unsigned char m[] = { 0x02, 0x01, 0x05, 0x00 };
    return expect_failure(m, sizeof m);
  }
  if(!strcmp(c, "length_too_wide")) {
    /* 5 length bytes cannot fit a uint32_t */
    static const unsigned char m[] = { 0x04, 0x85, 0x00, 0x00, 0x00, 0x00, 0x01, 'a', 0x00 };
    return expect_failure(m, sizeof m);
  }
  if(!strcmp(c, "empty_packet")) {
    return expect_failure((const unsigned char *)"", 0);
  }
  return 2;
}
