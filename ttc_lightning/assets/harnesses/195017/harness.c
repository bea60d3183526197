/* Harness for gpac GetHintFormat (isomedia/hint_track.c), CVE-2021-40576.
 * Stand-ins: the ISOBMFF box structs as gpac lays them out (only the fields the function touches, plus the
 * common box header), and GF_List with gpac's gf_list_get (NULL when the index is out of range). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;

typedef struct {
	void **slots;
	u32 entryCount;
} GF_List;

static void *gf_list_get(GF_List *ptr, u32 itemNumber)
{
	if (!ptr || (itemNumber >= ptr->entryCount)) return NULL;
	return ptr->slots[itemNumber];
}

#define GF_4CC(a, b, c, d) ((((u32)a) << 24) | (((u32)b) << 16) | (((u32)c) << 8) | ((u32)d))
#define GF_ISOM_BOX_TYPE_HMHD GF_4CC('h', 'm', 'h', 'd')
#define GF_ISOM_BOX_TYPE_NMHD GF_4CC('n', 'm', 'h', 'd')
#define GF_ISOM_BOX_TYPE_RTP_STSD GF_4CC('r', 't', 'p', ' ')
#define GF_ISOM_BOX_TYPE_SRTP_STSD GF_4CC('s', 'r', 't', 'p')

#define GF_ISOM_BOX \
	u32 type;       \
	u64 size;       \
	GF_List *child_boxes;
#define GF_ISOM_FULL_BOX \
	GF_ISOM_BOX      \
	u8 version;      \
	u32 flags;

typedef struct { GF_ISOM_BOX } GF_Box;

typedef struct {
	GF_ISOM_FULL_BOX
	/*this is used for us INTERNALLY*/
	u32 subType;
	u32 maxPDUSize;
	u32 avgPDUSize;
	u32 maxBitrate;
	u32 avgBitrate;
	u32 slidingAverageBitrate;
} GF_HintMediaHeaderBox;

typedef struct { GF_ISOM_FULL_BOX } GF_SampleDescriptionBox; /* entries live in child_boxes */

typedef struct {
	GF_ISOM_BOX
	GF_SampleDescriptionBox *SampleDescription;
} GF_SampleTableBox;

typedef struct __tag_media_info_box {
	GF_ISOM_BOX
	void *dataInformation;
	GF_SampleTableBox *sampleTable;
	GF_Box *InfoHeader; /* the media header (hmhd for hint tracks); NULL when the file has none */
} GF_MediaInformationBox;

typedef struct {
	GF_ISOM_BOX
	struct __tag_media_info_box *information;
} GF_MediaBox;

typedef struct {
	GF_ISOM_BOX
	GF_MediaBox *Media;
} GF_TrackBox;

#include "function.c"

/* ---- driver ---- */

typedef struct {
	GF_TrackBox *trak;
	GF_MediaBox *mdia;
	GF_MediaInformationBox *minf;
	GF_SampleTableBox *stbl;
	GF_SampleDescriptionBox *stsd;
	GF_List *entries;
	GF_Box *entry;
	GF_Box *header;
} Track;

/* header_type 0: the minf has no media header box (InfoHeader NULL); entry_type 0: stsd has no entry */
static Track make_track(u32 header_type, u32 sub_type, u32 entry_type)
{
	Track t;
	memset(&t, 0, sizeof t);
	t.trak = calloc(1, sizeof *t.trak);
	t.mdia = calloc(1, sizeof *t.mdia);
	t.minf = calloc(1, sizeof *t.minf);
	t.stbl = calloc(1, sizeof *t.stbl);
	t.stsd = calloc(1, sizeof *t.stsd);
	t.entries = calloc(1, sizeof *t.entries);
	t.trak->Media = t.mdia;
	t.mdia->information = t.minf;
	t.minf->sampleTable = t.stbl;
	t.stbl->SampleDescription = t.stsd;
	t.stsd->child_boxes = t.entries;
	if (entry_type) {
		t.entry = calloc(1, sizeof *t.entry);
		t.entry->type = entry_type;
		t.entries->slots = malloc(sizeof(void *));
		t.entries->slots[0] = t.entry;
		t.entries->entryCount = 1;
	}
	if (header_type == GF_ISOM_BOX_TYPE_HMHD) {
		GF_HintMediaHeaderBox *h = calloc(1, sizeof *h);
		h->type = header_type;
		h->subType = sub_type;
		t.header = (GF_Box *)h;
	} else if (header_type) {
		t.header = calloc(1, sizeof(GF_Box) + 16);
		t.header->type = header_type;
	}
	t.minf->InfoHeader = t.header;
	return t;
}

static void free_track(Track *t)
{
	free(t->header);
	free(t->entry);
	free(t->entries->slots);
	free(t->entries);
	free(t->stsd);
	free(t->stbl);
	free(t->minf);
	free(t->mdia);
	free(t->trak);
}

static int expect(const char *what, u32 got, u32 want)
{
	if (got != want) {
		fprintf(stderr, "%s: got 0x%08x, want 0x%08x\n", what, got, want);
		return 1;
	}
	return 0;
}

/* proof: a hint track whose minf carries no media header box (a crafted file, gpac issue #1904) */
static int case_no_media_header(void)
{
	Track t = make_track(0, 0, GF_ISOM_BOX_TYPE_RTP_STSD);
	int bad = expect("format", GetHintFormat(t.trak), 0);
	free_track(&t);
	return bad;
}

/* hmhd already knows its subtype: returned as is */
static int case_subtype_set(void)
{
	Track t = make_track(GF_ISOM_BOX_TYPE_HMHD, GF_ISOM_BOX_TYPE_SRTP_STSD, GF_ISOM_BOX_TYPE_RTP_STSD);
	int bad = expect("format", GetHintFormat(t.trak), GF_ISOM_BOX_TYPE_SRTP_STSD);
	bad |= expect("subType", ((GF_HintMediaHeaderBox *)t.header)->subType, GF_ISOM_BOX_TYPE_SRTP_STSD);
	free_track(&t);
	return bad;
}

/* hmhd without subtype: taken from the first sample description entry and cached in hmhd */
static int case_subtype_from_stsd(void)
{
	Track t = make_track(GF_ISOM_BOX_TYPE_HMHD, 0, GF_ISOM_BOX_TYPE_RTP_STSD);
	int bad = expect("format", GetHintFormat(t.trak), GF_ISOM_BOX_TYPE_RTP_STSD);
	bad |= expect("cached subType", ((GF_HintMediaHeaderBox *)t.header)->subType, GF_ISOM_BOX_TYPE_RTP_STSD);
	bad |= expect("second call", GetHintFormat(t.trak), GF_ISOM_BOX_TYPE_RTP_STSD);
	free_track(&t);
	return bad;
}

/* hmhd without subtype and an empty stsd: 0 */
static int case_no_sample_entry(void)
{
	Track t = make_track(GF_ISOM_BOX_TYPE_HMHD, 0, 0);
	int bad = expect("format", GetHintFormat(t.trak), 0);
	bad |= expect("subType", ((GF_HintMediaHeaderBox *)t.header)->subType, 0);
	free_track(&t);
	return bad;
}

/* the media header is not a hint media header: not a hint format */
static int case_not_hint_header(void)
{
	Track t = make_track(GF_ISOM_BOX_TYPE_NMHD, 0, GF_ISOM_BOX_TYPE_RTP_STSD);
	int bad = expect("format", GetHintFormat(t.trak), 0);
	free_track(&t);
	return bad;
}

int main(int argc, char **argv)
{
	static const struct { const char *name; int (*run)(void); } cases[] = {
		{"no_media_header", case_no_media_header},
		{"subtype_set", case_subtype_set},
		{"subtype_from_stsd", case_subtype_from_stsd},
		{"no_sample_entry", case_no_sample_entry},
		{"not_hint_header", case_not_hint_header},
	};
	if (argc < 2) return 2;
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
		if (!strcmp(argv[1], cases[i].name)) return cases[i].run();
	return 2;
}
