/* Harness for gpac svc_parse_slice (src/media_tools/av_parsers.c), CVE-2021-40568 (gpac #1900).
 * Stand-ins: the AVC parser state types (AVC_SPS, AVC_PPS, AVCSliceInfo, AVCState) with gpac's layout at the fix's
 * parent (include/gpac/internal/media_dev.h: sps[32], pps[255], the fields in their order; the VUI/HRD members the
 * function never reads are reduced to an opaque block), and a read-mode GF_BitStream over a heap buffer with gpac's
 * bit reader (MSB first, 0 past the end) and exp-Golomb readers (gf_bs_read_ue_log_idx3, gf_bs_read_se) as of the
 * fix. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint8_t u8;
typedef int8_t s8;
typedef uint16_t u16;
typedef int16_t s16;
typedef uint32_t u32;
typedef int32_t s32;
typedef uint64_t u64;
typedef u32 Bool;

#define GF_SVC_SSPS_ID_SHIFT 16
#define GF_AVC_NALU_IDR_SLICE 5
#define GF_AVC_NALU_SVC_SLICE 20

/* ---- GF_BitStream, read mode over memory (src/utils/bitstream.c) ---- */
typedef struct {
	const u8 *original;
	u64 size;
	u64 position;
	u32 current;
	u32 nbBits;
} GF_BitStream;

static u8 BS_ReadByte(GF_BitStream *bs)
{
	if (bs->position >= bs->size) return 0; /* overread: gpac logs and returns 0 */
	return bs->original[bs->position++];
}

static u8 gf_bs_read_bit(GF_BitStream *bs)
{
	s32 ret;
	if (bs->nbBits == 8) {
		bs->current = BS_ReadByte(bs);
		bs->nbBits = 0;
	}
	bs->current <<= 1;
	bs->nbBits++;
	ret = (bs->current & 0x100) >> 8;
	return (u8)ret;
}

static u32 gf_bs_read_int(GF_BitStream *bs, u32 nBits)
{
	u32 ret = 0;
	while (nBits-- > 0) {
		ret <<= 1;
		ret |= gf_bs_read_bit(bs);
	}
	return ret;
}

static u64 gf_bs_available(GF_BitStream *bs)
{
	return bs->size - bs->position;
}

/* av_parsers.c, as of the fix (which also moved the 32-leading-zeros test out of the loop) */
static u32 gf_bs_read_ue_log_idx3(GF_BitStream *bs, const char *fname, s32 idx1, s32 idx2, s32 idx3)
{
	u32 val = 0, code;
	s32 nb_lead = -1;
	(void)fname; (void)idx1; (void)idx2; (void)idx3;
	for (code = 0; !code; nb_lead++) {
		if (nb_lead >= 32) break;
		code = gf_bs_read_int(bs, 1);
	}
	if (nb_lead >= 32) {
		(void)gf_bs_available(bs); /* gpac logs "exp-golomb read failed" / "corrupted exp-golomb code" */
		return 0;
	}
	if (nb_lead) {
		u32 leads = 1;
		val = gf_bs_read_int(bs, nb_lead);
		leads <<= nb_lead;
		leads -= 1;
		val += leads;
	}
	return val;
}
#define gf_bs_read_ue_log(_bs, _fname) gf_bs_read_ue_log_idx3(_bs, _fname, -1, -1, -1)

static s32 gf_bs_read_se(GF_BitStream *bs)
{
	u32 v = gf_bs_read_ue_log(bs, NULL);
	if ((v & 0x1) == 0) return (s32)(0 - (v >> 1));
	return (v + 1) >> 1;
}
#define gf_bs_read_se_log(_bs, _fname) gf_bs_read_se(_bs)
#define gf_bs_read_int_log(_bs, _nBits, _fname) gf_bs_read_int(_bs, _nBits)

/* ---- media_dev.h ---- */
typedef struct {
	s32 profile_idc;
	s32 level_idc;
	s32 prof_compat;
	s32 log2_max_frame_num;
	u32 poc_type, poc_cycle_length;
	s32 log2_max_poc_lsb;
	s32 delta_pic_order_always_zero_flag;
	s32 offset_for_non_ref_pic, offset_for_top_to_bottom_field;
	Bool frame_mbs_only_flag;
	Bool mb_adaptive_frame_field_flag;
	u32 max_num_ref_frames;
	Bool gaps_in_frame_num_value_allowed_flag;
	u8 chroma_format;
	u8 luma_bit_depth_m8;
	u8 chroma_bit_depth_m8;
	u32 ChromaArrayType;
	s16 offset_for_ref_frame[256];
	u32 width, height;
	Bool vui_parameters_present_flag;
	u8 vui_and_crop[160]; /* AVC_VUI vui; AVC_CROP crop; (not read here) */
	u32 state;
	u32 sbusps_crc;
	u32 nb_ei, nb_ep, nb_eb;
} AVC_SPS;

typedef struct {
	s32 id;
	s32 sps_id;
	Bool entropy_coding_mode_flag;
	s32 pic_order_present;
	s32 redundant_pic_cnt_present;
	u32 slice_group_count;
	u32 mb_slice_group_map_type;
	u32 pic_size_in_map_units_minus1;
	u32 slice_group_change_rate_minus1;
	u32 status;
	Bool weighted_pred_flag;
	u8 weighted_bipred_idc;
	Bool deblocking_filter_control_present_flag;
	u32 num_ref_idx_l0_default_active_minus1, num_ref_idx_l1_default_active_minus1;
} AVC_PPS;

typedef struct {
	s32 idr_pic_flag;
	u8 temporal_id, priority_id, dependency_id, quality_id;
} SVC_NALUHeader;

typedef struct {
	u8 nal_ref_idc, nal_unit_type, field_pic_flag, bottom_field_flag;
	u32 frame_num, idr_pic_id, poc_lsb, slice_type;
	s32 delta_poc_bottom;
	s32 delta_poc[2];
	s32 redundant_pic_cnt;
	s32 poc;
	u32 poc_msb, poc_msb_prev, poc_lsb_prev, frame_num_prev;
	s32 frame_num_offset, frame_num_offset_prev;
	AVC_SPS *sps;
	AVC_PPS *pps;
	SVC_NALUHeader NalHeader;
} AVCSliceInfo;

typedef struct {
	AVC_SPS sps[32]; /* range allowed in the spec is 0..31 */
	s8 sps_active_idx, pps_active_idx;
	AVC_PPS pps[255];
	AVCSliceInfo s_info;
	u8 sei[16]; /* AVCSei (not read here) */
	Bool is_svc;
	u8 last_nal_type_parsed;
	s8 last_ps_idx;
} AVCState;

#include "function.c"

/* ---- driver ---- */

/* MSB-first bit writer for building slice headers */
typedef struct {
	u8 buf[64];
	u32 bits;
} BitWriter;

static void put_bits(BitWriter *w, u64 value, u32 n)
{
	while (n--) {
		if ((value >> n) & 1) w->buf[w->bits / 8] |= (u8)(0x80 >> (w->bits % 8));
		w->bits++;
	}
}

static void put_ue(BitWriter *w, u64 v) /* v up to 2^32 - 2 */
{
	u64 code = v + 1;
	u32 len = 0;
	while ((code >> len) > 1) len++;
	put_bits(w, 0, len);
	put_bits(w, code, len + 1);
}

static void put_se(BitWriter *w, s32 v)
{
	put_ue(w, v > 0 ? 2 * (u64)v - 1 : 2 * (u64)(-(int64_t)v));
}

static int run(BitWriter *w, AVCState *avc, AVCSliceInfo *si)
{
	u32 nbytes = (w->bits + 7) / 8 + 1; /* one byte of rbsp trailing bits */
	u8 *data = malloc(nbytes);
	GF_BitStream bs = {0};
	int ret;
	memcpy(data, w->buf, nbytes - 1);
	data[nbytes - 1] = 0x80;
	bs.original = data;
	bs.size = nbytes;
	bs.nbBits = 8;
	ret = svc_parse_slice(&bs, avc, si);
	free(data);
	return ret;
}

static AVCState *new_state(void)
{
	AVCState *avc = calloc(1, sizeof(AVCState));
	avc->sps_active_idx = avc->pps_active_idx = -1;
	return avc;
}

#define EXPECT(cond) do { if (!(cond)) { fprintf(stderr, "FAIL: %s (line %d)\n", #cond, __LINE__); fail = 1; } } while (0)

int main(int argc, char **argv)
{
	AVCState *avc;
	AVCSliceInfo si;
	BitWriter w;
	int fail = 0, ret;
	const char *c;

	if (argc < 2) return 2;
	c = argv[1];
	avc = new_state();
	memset(&si, 0, sizeof si);
	memset(&w, 0, sizeof w);
	si.nal_unit_type = GF_AVC_NALU_SVC_SLICE;

	/* pps 3 -> subset sps 1 (stored at 1 + GF_SVC_SSPS_ID_SHIFT) */
	avc->pps[3].sps_id = 1;
	avc->pps[3].slice_group_count = 1;
	avc->sps[1 + GF_SVC_SSPS_ID_SHIFT].log2_max_frame_num = 4;
	avc->sps[1 + GF_SVC_SSPS_ID_SHIFT].frame_mbs_only_flag = 1;
	avc->sps[1 + GF_SVC_SSPS_ID_SHIFT].poc_type = 0;
	avc->sps[1 + GF_SVC_SSPS_ID_SHIFT].log2_max_poc_lsb = 6;
	avc->sps[1 + GF_SVC_SSPS_ID_SHIFT].state = 1;

	if (!strcmp(c, "negative_pps_id")) {
		/* pps_id coded with 31 leading zeros: 0xFFFFFFFE, which is -2 in the s32 pps_id */
		put_ue(&w, 0);            /* first_mb_in_slice */
		put_ue(&w, 0);            /* slice_type */
		put_ue(&w, 0xFFFFFFFEu);  /* pps_id */
		put_bits(&w, 0x5, 4);
		ret = run(&w, avc, &si);
		EXPECT(ret == -1);
		EXPECT(si.pps == NULL);
	} else if (!strcmp(c, "idr_frame_slice")) {
		si.NalHeader.idr_pic_flag = 1;
		put_ue(&w, 12);        /* first_mb_in_slice */
		put_ue(&w, 7);         /* slice_type */
		put_ue(&w, 3);         /* pps_id */
		put_bits(&w, 9, 4);    /* frame_num (log2_max_frame_num bits) */
		put_ue(&w, 5);         /* idr_pic_id */
		put_bits(&w, 33, 6);   /* poc_lsb (log2_max_poc_lsb bits) */
		ret = run(&w, avc, &si);
		EXPECT(ret == 0);
		EXPECT(si.slice_type == 7);
		EXPECT(si.pps == &avc->pps[3] && avc->pps[3].id == 3);
		EXPECT(si.sps == &avc->sps[1 + GF_SVC_SSPS_ID_SHIFT]);
		EXPECT(si.frame_num == 9);
		EXPECT(si.field_pic_flag == 0);
		EXPECT(si.idr_pic_id == 5);
		EXPECT(si.poc_lsb == 33);
	} else if (!strcmp(c, "field_poc_type1")) {
		AVC_SPS *sps = &avc->sps[1 + GF_SVC_SSPS_ID_SHIFT];
		sps->frame_mbs_only_flag = 0;
		sps->poc_type = 1;
		sps->delta_pic_order_always_zero_flag = 0;
		avc->pps[3].pic_order_present = 1;
		avc->pps[3].redundant_pic_cnt_present = 1;
		put_ue(&w, 0);
		put_ue(&w, 2);         /* slice_type */
		put_ue(&w, 3);         /* pps_id */
		put_bits(&w, 15, 4);   /* frame_num */
		put_bits(&w, 1, 1);    /* field_pic_flag */
		put_bits(&w, 1, 1);    /* bottom_field_flag */
		put_se(&w, -3);        /* delta_poc[0]; no delta_poc[1] for a field */
		put_ue(&w, 2);         /* redundant_pic_cnt */
		ret = run(&w, avc, &si);
		EXPECT(ret == 0);
		EXPECT(si.frame_num == 15);
		EXPECT(si.field_pic_flag == 1 && si.bottom_field_flag == 1);
		EXPECT(si.delta_poc[0] == -3 && si.delta_poc[1] == 0);
		EXPECT(si.redundant_pic_cnt == 2);
	} else if (!strcmp(c, "delta_poc_bottom")) {
		avc->pps[3].pic_order_present = 1;
		put_ue(&w, 1);
		put_ue(&w, 5);
		put_ue(&w, 3);
		put_bits(&w, 2, 4);    /* frame_num */
		put_bits(&w, 63, 6);   /* poc_lsb */
		put_se(&w, -17);       /* delta_poc_bottom */
		ret = run(&w, avc, &si);
		EXPECT(ret == 0);
		EXPECT(si.frame_num == 2 && si.poc_lsb == 63);
		EXPECT(si.delta_poc_bottom == -17);
		EXPECT(si.idr_pic_id == 0);
	} else if (!strcmp(c, "bad_slice_type")) {
		put_ue(&w, 0);
		put_ue(&w, 10);
		put_ue(&w, 3);
		ret = run(&w, avc, &si);
		EXPECT(ret == -1);
		EXPECT(si.pps == NULL);
	} else if (!strcmp(c, "pps_id_too_large")) {
		put_ue(&w, 0);
		put_ue(&w, 1);
		put_ue(&w, 300);
		ret = run(&w, avc, &si);
		EXPECT(ret == -1);
		EXPECT(si.pps == NULL);
	} else if (!strcmp(c, "unset_parameter_sets")) {
		/* pps 7 never parsed (no slice groups): -2; pps 4 parsed but its sps not: -2 */
		put_ue(&w, 0);
		put_ue(&w, 0);
		put_ue(&w, 7);
		ret = run(&w, avc, &si);
		EXPECT(ret == -2);
		EXPECT(si.pps == &avc->pps[7] && avc->pps[7].id == 7);
		memset(&w, 0, sizeof w);
		avc->pps[4].sps_id = 2;
		avc->pps[4].slice_group_count = 1;
		put_ue(&w, 0);
		put_ue(&w, 0);
		put_ue(&w, 4);
		ret = run(&w, avc, &si);
		EXPECT(ret == -2);
		EXPECT(si.sps == &avc->sps[2 + GF_SVC_SSPS_ID_SHIFT]);
	} else {
		free(avc);
		return 2;
	}
	free(avc);
	return fail;
}
