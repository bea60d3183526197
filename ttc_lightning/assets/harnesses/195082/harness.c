/* Harness for linux recalc_intercepts (arch/x86/kvm/svm/nested.c), CVE-2021-3656.
 *
 * recalc_intercepts builds the intercepts of vmcb02, the VMCB KVM (L0) runs a nested guest (L2) with, from
 * vmcb01's (L0's own intercepts for L1, `h`) and the ones L1 asked for in its vmcb12 (cached in
 * svm->nested.ctl, `g`). The bug is a missing intercept: when L0 runs L1 with Virtual VMLOAD/VMSAVE (the vls
 * module parameter: for an L1 whose CPUID is not Intel's, svm_vcpu_after_set_cpuid clears VMLOAD/VMSAVE from
 * vmcb01) and L1 does not intercept them either, L2
 * executes VMLOAD/VMSAVE unintercepted, on host physical addresses. A harness cannot execute VMLOAD; it checks
 * what the CPU would be told: the intercept bits of vmcb02 after the call.
 *
 * Stand-ins: the intercept words and bit numbers of arch/x86/include/asm/svm.h (5.14), a vmcb_control_area
 * reduced to the fields recalc_intercepts touches (intercepts, int_ctl, clean, virt_ext), vcpu_svm with vmcb,
 * vmcb01 and nested.ctl, is_guest_mode on HF_GUEST_MASK, the intercept_smi module parameter, and the
 * vmcb_{set,clr,is}_intercept / vmcb_mark_dirty helpers of arch/x86/kvm/svm/svm.h (bit operations on the u32
 * words, which is what __set_bit on the array does on x86). */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint8_t u8;
typedef uint32_t u32;
typedef uint64_t u64;

enum intercept_words {
	INTERCEPT_CR = 0,
	INTERCEPT_DR,
	INTERCEPT_EXCEPTION,
	INTERCEPT_WORD3,
	INTERCEPT_WORD4,
	INTERCEPT_WORD5,
	MAX_INTERCEPT,
};

enum {
	INTERCEPT_CR0_READ = 0,
	INTERCEPT_CR3_READ = 3,
	INTERCEPT_CR4_READ = 4,
	INTERCEPT_CR8_READ = 8,
	INTERCEPT_CR0_WRITE = 16,
	INTERCEPT_CR3_WRITE = 16 + 3,
	INTERCEPT_CR4_WRITE = 16 + 4,
	INTERCEPT_CR8_WRITE = 16 + 8,
	INTERCEPT_DR7_READ = 32 + 7,
	INTERCEPT_DR7_WRITE = 48 + 7,
	INTERCEPT_EXCEPTION_OFFSET = 64,
	INTERCEPT_INTR = 96,
	INTERCEPT_NMI,
	INTERCEPT_SMI,
	INTERCEPT_INIT,
	INTERCEPT_VINTR,
	INTERCEPT_CPUID = 96 + 18,
	INTERCEPT_HLT = 96 + 24,
	INTERCEPT_MSR_PROT = 96 + 28,
	INTERCEPT_SHUTDOWN = 96 + 31,
	INTERCEPT_VMRUN = 128,
	INTERCEPT_VMMCALL,
	INTERCEPT_VMLOAD,
	INTERCEPT_VMSAVE,
	INTERCEPT_STGI,
	INTERCEPT_CLGI,
	INTERCEPT_SKINIT,
	INTERCEPT_RDTSCP,
	INTERCEPT_INVPCID = 160 + 2,
};

#define V_INTR_MASKING_SHIFT 24
#define V_INTR_MASKING_MASK (1 << V_INTR_MASKING_SHIFT)
#define VIRTUAL_VMLOAD_VMSAVE_ENABLE_MASK (1 << 1)
#define HF_GUEST_MASK (1 << 0)

enum { VMCB_INTERCEPTS, VMCB_PERM_MAP, VMCB_ASID, VMCB_INTR, VMCB_NPT, VMCB_CR, VMCB_DR, VMCB_DT, VMCB_SEG,
       VMCB_CR2, VMCB_LBR, VMCB_AVIC, VMCB_DIRTY_MAX };

struct vmcb_control_area {
	u32 intercepts[MAX_INTERCEPT];
	u32 int_ctl;
	u32 clean;
	u64 virt_ext;
};

struct vmcb {
	struct vmcb_control_area control;
};

struct kvm_vcpu {
	struct { u32 hflags; } arch;
};

struct kvm_vmcb_info {
	struct vmcb *ptr;
};

struct svm_nested_state {
	struct vmcb_control_area ctl; /* L1's vmcb12 controls, as cached at VMRUN */
};

struct vcpu_svm {
	struct kvm_vcpu vcpu;
	struct vmcb *vmcb;            /* the VMCB in use: vmcb02 while L2 runs */
	struct kvm_vmcb_info vmcb01;
	struct svm_nested_state nested;
};

static bool intercept_smi = true;

static inline bool is_guest_mode(struct kvm_vcpu *vcpu)
{
	return vcpu->arch.hflags & HF_GUEST_MASK;
}

static inline void vmcb_mark_dirty(struct vmcb *vmcb, int bit)
{
	vmcb->control.clean &= ~(1u << bit);
}

static inline void vmcb_set_intercept(struct vmcb_control_area *control, u32 bit)
{
	if (bit >= 32 * MAX_INTERCEPT) abort(); /* WARN_ON_ONCE */
	control->intercepts[bit / 32] |= 1u << (bit % 32);
}

static inline void vmcb_clr_intercept(struct vmcb_control_area *control, u32 bit)
{
	if (bit >= 32 * MAX_INTERCEPT) abort();
	control->intercepts[bit / 32] &= ~(1u << (bit % 32));
}

static inline bool vmcb_is_intercept(struct vmcb_control_area *control, u32 bit)
{
	if (bit >= 32 * MAX_INTERCEPT) abort();
	return control->intercepts[bit / 32] & (1u << (bit % 32));
}

#include "function.c"

/* ---- driver ---- */

static int fail;
#define EXPECT(cond) do { if (!(cond)) { fprintf(stderr, "FAIL: %s (line %d)\n", #cond, __LINE__); fail = 1; } } while (0)

static void set_bits(struct vmcb_control_area *c, const u32 *bits, int n)
{
	for (int i = 0; i < n; i++) vmcb_set_intercept(c, bits[i]);
}

/* vmcb01 as init_vmcb sets it up for L1: CR/DR/exception intercepts, INTR/NMI/SMI/..., VMRUN/VMMCALL,
 * VMLOAD/VMSAVE; with vls (and an L1 CPUID that is not Intel's), svm_vcpu_after_set_cpuid then clears
 * VMLOAD/VMSAVE and sets virt_ext's VLS enable bit */
static void init_vmcb01(struct vmcb *v, bool vls)
{
	static const u32 bits[] = {
		INTERCEPT_CR0_READ, INTERCEPT_CR3_READ, INTERCEPT_CR4_READ, INTERCEPT_CR8_READ, INTERCEPT_CR0_WRITE,
		INTERCEPT_CR3_WRITE, INTERCEPT_CR4_WRITE, INTERCEPT_CR8_WRITE, INTERCEPT_DR7_READ, INTERCEPT_DR7_WRITE,
		INTERCEPT_EXCEPTION_OFFSET + 17, INTERCEPT_EXCEPTION_OFFSET + 18, INTERCEPT_INTR, INTERCEPT_NMI,
		INTERCEPT_SMI, INTERCEPT_VINTR, INTERCEPT_CPUID, INTERCEPT_HLT, INTERCEPT_MSR_PROT, INTERCEPT_SHUTDOWN,
		INTERCEPT_VMRUN, INTERCEPT_VMMCALL, INTERCEPT_VMLOAD, INTERCEPT_VMSAVE, INTERCEPT_STGI, INTERCEPT_CLGI,
		INTERCEPT_SKINIT, INTERCEPT_RDTSCP,
	};
	memset(v, 0, sizeof *v);
	set_bits(&v->control, bits, (int)(sizeof bits / sizeof bits[0]));
	if (vls) {
		vmcb_clr_intercept(&v->control, INTERCEPT_VMLOAD);
		vmcb_clr_intercept(&v->control, INTERCEPT_VMSAVE);
		v->control.virt_ext |= VIRTUAL_VMLOAD_VMSAVE_ENABLE_MASK;
	}
	v->control.clean = 0xffffffffu;
}

struct setup {
	struct vcpu_svm svm;
	struct vmcb *vmcb01, *vmcb02;
};

static struct setup *nested_setup(bool vls)
{
	struct setup *s = calloc(1, sizeof *s);
	s->vmcb01 = malloc(sizeof(struct vmcb));
	s->vmcb02 = calloc(1, sizeof(struct vmcb));
	init_vmcb01(s->vmcb01, vls);
	s->svm.vmcb01.ptr = s->vmcb01;
	s->svm.vmcb = s->vmcb02;
	s->vmcb02->control.clean = 0xffffffffu;
	s->svm.vcpu.arch.hflags = HF_GUEST_MASK;
	vmcb_set_intercept(&s->svm.nested.ctl, INTERCEPT_VMRUN); /* nested VMRUN requires L1 to intercept VMRUN */
	return s;
}

static void done(struct setup *s)
{
	free(s->vmcb01);
	free(s->vmcb02);
	free(s);
}

/* what the merge must give: h, less VMMCALL (and CR8/VINTR under V_INTR_MASKING), or g, less SMI unless
 * intercept_smi; h here always intercepts VMLOAD/VMSAVE (vls off), so the fix's forced bits change nothing */
static void expect_merge(struct setup *s)
{
	struct vmcb_control_area want = s->vmcb01->control, *g = &s->svm.nested.ctl;
	if (g->int_ctl & V_INTR_MASKING_MASK) {
		vmcb_clr_intercept(&want, INTERCEPT_CR8_READ);
		vmcb_clr_intercept(&want, INTERCEPT_CR8_WRITE);
		vmcb_clr_intercept(&want, INTERCEPT_VINTR);
	}
	vmcb_clr_intercept(&want, INTERCEPT_VMMCALL);
	for (int i = 0; i < MAX_INTERCEPT; i++) want.intercepts[i] |= g->intercepts[i];
	if (!intercept_smi) vmcb_clr_intercept(&want, INTERCEPT_SMI);
	for (int i = 0; i < MAX_INTERCEPT; i++) {
		if (s->vmcb02->control.intercepts[i] != want.intercepts[i]) {
			fprintf(stderr, "FAIL: intercept word %d = %#x, want %#x\n", i, s->vmcb02->control.intercepts[i],
				want.intercepts[i]);
			fail = 1;
		}
	}
	EXPECT(!(s->vmcb02->control.clean & (1u << VMCB_INTERCEPTS)));
	EXPECT(s->vmcb02->control.clean & (1u << VMCB_ASID)); /* only the intercepts are marked dirty */
}

int main(int argc, char **argv)
{
	struct setup *s;
	const char *c;

	if (argc < 2) return 2;
	c = argv[1];
	if (!strcmp(c, "vls_l1_skips_vmload")) {
		/* L0 runs L1 with Virtual VMLOAD/VMSAVE; L1 runs L2 without intercepting VMLOAD/VMSAVE */
		s = nested_setup(true);
		recalc_intercepts(&s->svm);
		if (!vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_VMLOAD) ||
		    !vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_VMSAVE)) {
			fprintf(stderr, "FAIL: vmcb02 lets L2 run VMLOAD/VMSAVE unintercepted, on host physical memory\n");
			fail = 1;
		}
		EXPECT(vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_VMRUN));
		done(s);
	} else if (!strcmp(c, "merge_l0_and_l1")) {
		static const u32 l1[] = { INTERCEPT_CR3_WRITE, INTERCEPT_EXCEPTION_OFFSET + 14, INTERCEPT_HLT,
					  INTERCEPT_VMLOAD, INTERCEPT_VMSAVE, INTERCEPT_INVPCID };
		s = nested_setup(false);
		set_bits(&s->svm.nested.ctl, l1, 6);
		memset(s->vmcb02->control.intercepts, 0xff, sizeof s->vmcb02->control.intercepts); /* stale bits */
		recalc_intercepts(&s->svm);
		expect_merge(s);
		EXPECT(!vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_VMMCALL));
		done(s);
	} else if (!strcmp(c, "l1_vmmcall_kept")) {
		s = nested_setup(false);
		vmcb_set_intercept(&s->svm.nested.ctl, INTERCEPT_VMMCALL);
		recalc_intercepts(&s->svm);
		expect_merge(s);
		EXPECT(vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_VMMCALL));
		done(s);
	} else if (!strcmp(c, "v_intr_masking")) {
		s = nested_setup(false);
		s->svm.nested.ctl.int_ctl |= V_INTR_MASKING_MASK;
		vmcb_set_intercept(&s->svm.nested.ctl, INTERCEPT_CR8_WRITE);
		recalc_intercepts(&s->svm);
		expect_merge(s);
		EXPECT(!vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_CR8_READ));
		EXPECT(vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_CR8_WRITE));
		EXPECT(!vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_VINTR));
		done(s);
	} else if (!strcmp(c, "smi_intercept")) {
		s = nested_setup(false);
		vmcb_set_intercept(&s->svm.nested.ctl, INTERCEPT_SMI);
		intercept_smi = false;
		recalc_intercepts(&s->svm);
		expect_merge(s);
		EXPECT(!vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_SMI));
		intercept_smi = true;
		recalc_intercepts(&s->svm);
		expect_merge(s);
		EXPECT(vmcb_is_intercept(&s->vmcb02->control, INTERCEPT_SMI));
		done(s);
	} else if (!strcmp(c, "not_guest_mode")) {
		/* L1 itself runs on vmcb01: only the dirty bit changes */
		struct vmcb before;
		s = nested_setup(false);
		s->svm.vcpu.arch.hflags = 0;
		s->svm.vmcb = s->vmcb01;
		before = *s->vmcb01;
		recalc_intercepts(&s->svm);
		EXPECT(!memcmp(s->vmcb01->control.intercepts, before.control.intercepts, sizeof before.control.intercepts));
		EXPECT(s->vmcb01->control.clean == (before.control.clean & ~(1u << VMCB_INTERCEPTS)));
		done(s);
	} else {
		return 2;
	}
	return fail;
}
