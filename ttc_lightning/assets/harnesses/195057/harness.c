/* Harness for keepkey-firmware ethereum_extractThorchainData (lib/firmware/ethereum.c), CVE-2021-31616.
 * Stand-ins: the nanopb EthereumSignTx message with the fields the function touches (has_data_length,
 * data_length, data_initial_chunk as PB_BYTES_ARRAY_T(1024), per messages.options), and the caller's
 * `char swap_data[256]` stack buffer from ethereum_signing_init. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t pb_size_t;

typedef struct {
	pb_size_t size;
	uint8_t bytes[20];
} EthereumSignTx_to_t;

typedef struct {
	pb_size_t size;
	uint8_t bytes[32];
} EthereumSignTx_value_t;

typedef struct {
	pb_size_t size;
	uint8_t bytes[1024]; /* EthereumSignTx.data_initial_chunk max_size:1024 */
} EthereumSignTx_data_initial_chunk_t;

typedef struct _EthereumSignTx {
	bool has_to;
	EthereumSignTx_to_t to;
	bool has_value;
	EthereumSignTx_value_t value;
	bool has_data_initial_chunk;
	EthereumSignTx_data_initial_chunk_t data_initial_chunk;
	bool has_data_length;
	uint32_t data_length; /* total length of the contract data, sent by the host */
	bool has_chain_id;
	uint32_t chain_id;
} EthereumSignTx;

#include "function.c"

/* ---- driver ---- */

#define SWAP_OFFSET 164 /* deposit() selector + 5 words */

/* a THORChain deposit() message carrying `memo_len` bytes of memo after the fixed 164-byte head;
 * data_length is what the host claims, the chunk holds min(164 + memo_len, 1024) bytes */
static EthereumSignTx *make_msg(bool has_len, uint32_t data_length, uint32_t memo_len)
{
	EthereumSignTx *msg = calloc(1, sizeof *msg);
	msg->has_to = true;
	msg->to.size = 20;
	memcpy(msg->data_initial_chunk.bytes, "\x1f\xec\xe7\xb4", 4);
	uint32_t total = SWAP_OFFSET + memo_len;
	if (total > sizeof msg->data_initial_chunk.bytes) total = sizeof msg->data_initial_chunk.bytes;
	for (uint32_t i = SWAP_OFFSET; i < total; i++)
		msg->data_initial_chunk.bytes[i] = (uint8_t)('a' + (i - SWAP_OFFSET) % 26);
	msg->has_data_initial_chunk = true;
	msg->data_initial_chunk.size = (pb_size_t)total;
	msg->has_data_length = has_len;
	msg->data_length = data_length;
	return msg;
}

/* runs the function as ethereum_signing_init does: into a zeroed char[256] on the stack */
static int run(bool has_len, uint32_t data_length, uint32_t memo_len, unsigned want_len)
{
	EthereumSignTx *msg = make_msg(has_len, data_length, memo_len);
	char swap_data[256] = {'\0'};
	int bad = 0;
	uint8_t got = ethereum_extractThorchainData(msg, swap_data);
	if (got != want_len) {
		fprintf(stderr, "length: got %u, want %u\n", got, want_len);
		bad = 1;
	}
	for (unsigned i = 0; i < sizeof swap_data; i++) {
		char want = i < want_len ? (char)msg->data_initial_chunk.bytes[SWAP_OFFSET + i] : '\0';
		if (swap_data[i] != want) {
			fprintf(stderr, "swap_data[%u]: got 0x%02x, want 0x%02x\n", i, (unsigned char)swap_data[i],
			        (unsigned char)want);
			bad = 1;
			break;
		}
	}
	free(msg);
	return bad;
}

/* proof: the host claims 300 bytes of memo (data_length 464): must be refused, nothing copied */
static int case_memo_300(void) { return run(true, SWAP_OFFSET + 300, 300, 0); }
/* an ordinary memo is copied and its length returned */
static int case_memo_short(void) { return run(true, SWAP_OFFSET + 42, 42, 42); }
/* the longest memo that fits: 255 bytes */
static int case_memo_255(void) { return run(true, SWAP_OFFSET + 255, 255, 255); }
/* data no longer than the fixed head: no memo */
static int case_no_memo(void) { return run(true, SWAP_OFFSET, 0, 0) | run(true, 68, 0, 0); }
/* data_length absent: nothing copied */
static int case_no_data_length(void) { return run(false, SWAP_OFFSET + 42, 42, 0); }

int main(int argc, char **argv)
{
	static const struct { const char *name; int (*run)(void); } cases[] = {
		{"memo_300", case_memo_300},
		{"memo_short", case_memo_short},
		{"memo_255", case_memo_255},
		{"no_memo", case_no_memo},
		{"no_data_length", case_no_data_length},
	};
	if (argc < 2) return 2;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		if (!strcmp(argv[1], cases[i].name)) return cases[i].run();
	return 2;
}
