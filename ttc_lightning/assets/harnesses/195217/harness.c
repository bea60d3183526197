/* Harness for mruby mrb_proc_copy (src/proc.c), CVE-2022-0080.
 * Stand-ins follow mruby at the fix's parent: struct RProc and the MRB_PROC_* flags (include/mruby/proc.h),
 * mrb_irep with its uint16_t refcnt (include/mruby/irep.h), mrb_irep_incref/decref/free (src/state.c: incref
 * raises "too many irep references" when refcnt is UINT16_MAX after a GC), and obj_free's MRB_TT_PROC case
 * (src/gc.c), which drops a proc's irep reference when the proc is collected. mrb_raise longjmps. */
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MRB_API
typedef int64_t mrb_int;
typedef uint32_t mrb_sym;
typedef uint8_t mrb_code;
typedef struct mrb_state mrb_state;
typedef struct mrb_value { union { void *p; mrb_int i; } value; int tt; } mrb_value;
typedef mrb_value (*mrb_func_t)(mrb_state *mrb, mrb_value self);

enum mrb_vtype { MRB_TT_FALSE = 0, MRB_TT_PROC = 13, MRB_TT_ENV = 18 };

struct RClass { const char *name; };

#define MRB_OBJECT_HEADER \
  struct RClass *c; \
  struct RBasic *gcnext; \
  enum mrb_vtype tt:8; \
  uint32_t color:3; \
  uint32_t flags:21

struct RBasic { MRB_OBJECT_HEADER; };

struct mrb_jmpbuf { jmp_buf impl; };
struct mrb_state {
  struct mrb_jmpbuf *jmp;
  struct RClass *exc;
  const char *exc_msg;
};

static struct RClass runtime_error = {"RuntimeError"}, proc_class = {"Proc"};
#define E_RUNTIME_ERROR (&runtime_error)

static __attribute__((noreturn)) void mrb_raise(mrb_state *mrb, struct RClass *c, const char *msg)
{
  mrb->exc = c;
  mrb->exc_msg = msg;
  longjmp(mrb->jmp->impl, 1);
}
static void mrb_free(mrb_state *mrb, void *p) { (void)mrb; free(p); }

/* include/mruby/irep.h */
typedef struct mrb_irep {
  uint16_t nlocals;
  uint16_t nregs;
  uint16_t clen;
  uint8_t flags;
  const mrb_code *iseq;
  const void *pool;
  const mrb_sym *syms;
  const struct mrb_irep * const *reps;
  const mrb_sym *lv;
  void *debug_info;
  uint32_t ilen;
  uint16_t plen, slen;
  uint16_t rlen;
  uint16_t refcnt;
} mrb_irep;

#define MRB_ISEQ_NO_FREE 1
#define MRB_IREP_NO_FREE 2
#define MRB_IREP_STATIC  (MRB_ISEQ_NO_FREE | MRB_IREP_NO_FREE)

/* include/mruby/proc.h */
struct REnv {
  MRB_OBJECT_HEADER;
  mrb_value *stack;
  void *cxt;
  mrb_sym mid;
};

struct RProc {
  MRB_OBJECT_HEADER;
  union {
    const mrb_irep *irep;
    mrb_func_t func;
  } body;
  const struct RProc *upper;
  union {
    struct RClass *target_class;
    struct REnv *env;
  } e;
};

#define MRB_PROC_CFUNC_FL 128
#define MRB_PROC_CFUNC_P(p) (((p)->flags & MRB_PROC_CFUNC_FL) != 0)
#define MRB_PROC_STRICT 256
#define MRB_PROC_ENVSET 1024
#define MRB_PROC_SCOPE 2048

/* the GC: in these cases every proc referencing an irep is reachable, so a collection frees none of them */
static int gc_runs;
static void mrb_garbage_collect(mrb_state *mrb) { (void)mrb; gc_runs++; }

/* src/state.c */
static void mrb_irep_decref(mrb_state *mrb, mrb_irep *irep);

static void mrb_irep_free(mrb_state *mrb, mrb_irep *irep)
{
  int i;

  if (irep->flags & MRB_IREP_NO_FREE) return;
  if (!(irep->flags & MRB_ISEQ_NO_FREE))
    mrb_free(mrb, (void*)irep->iseq);
  mrb_free(mrb, (void*)irep->syms);
  if (irep->reps) {
    for (i=0; i<irep->rlen; i++) {
      if (irep->reps[i])
        mrb_irep_decref(mrb, (mrb_irep*)irep->reps[i]);
    }
    mrb_free(mrb, (void*)irep->reps);
  }
  mrb_free(mrb, (void*)irep->lv);
  mrb_free(mrb, irep);
}

static void mrb_irep_incref(mrb_state *mrb, mrb_irep *irep)
{
  if (irep->flags & MRB_IREP_NO_FREE) return;
  if (irep->refcnt == UINT16_MAX) {
    mrb_garbage_collect(mrb);
    if (irep->refcnt == UINT16_MAX) {
      mrb_raise(mrb, E_RUNTIME_ERROR, "too many irep references");
    }
  }
  irep->refcnt++;
}

static void mrb_irep_decref(mrb_state *mrb, mrb_irep *irep)
{
  if (irep->flags & MRB_IREP_NO_FREE) return;
  irep->refcnt--;
  if (irep->refcnt == 0) {
    mrb_irep_free(mrb, irep);
  }
}

/* the record's func starts at the name: its return type, on the line above in proc.c, is given here */
void
#include "function.c"

/* ---- driver ---- */

static mrb_state M;

static mrb_irep *new_irep(void)
{
  mrb_irep *irep = calloc(1, sizeof *irep);
  irep->ilen = 8;
  irep->iseq = calloc(irep->ilen, 1);
  irep->slen = 2;
  irep->syms = calloc(irep->slen, sizeof(mrb_sym));
  irep->refcnt = 1; /* the reference mrb_add_irep's caller holds until it builds the first proc */
  return irep;
}

static struct RProc *alloc_proc(void)
{
  struct RProc *p = calloc(1, sizeof *p); /* MRB_OBJ_ALLOC: zeroed, body.irep NULL */
  p->c = &proc_class;
  p->tt = MRB_TT_PROC;
  return p;
}

/* mrb_proc_new: a proc on irep, taking a reference */
static struct RProc *proc_new(mrb_irep *irep, uint32_t flags)
{
  struct RProc *p = alloc_proc();
  p->flags = flags;
  mrb_irep_incref(&M, irep);
  p->body.irep = irep;
  return p;
}

/* src/gc.c obj_free, MRB_TT_PROC */
static void proc_free(struct RProc *p)
{
  if (!MRB_PROC_CFUNC_P(p) && p->body.irep) {
    mrb_irep *irep = (mrb_irep*)p->body.irep;
    mrb_irep_decref(&M, irep);
  }
  free(p);
}

/* a.initialize_copy(b); returns 1 when it raised */
static int copy(struct RProc *a, struct RProc *b)
{
  struct mrb_jmpbuf jb;
  M.jmp = &jb;
  M.exc = NULL;
  if (setjmp(jb.impl) == 0) {
    mrb_proc_copy(&M, a, b);
    M.jmp = NULL;
    return 0;
  }
  M.jmp = NULL;
  return 1;
}

static int expect_u(const char *what, unsigned long got, unsigned long want)
{
  if (got != want) { fprintf(stderr, "%s: got %lu, want %lu\n", what, got, want); return 1; }
  return 0;
}

static int expect_same_proc(struct RProc *a, struct RProc *b)
{
  int bad = expect_u("flags", a->flags, b->flags);
  if (a->body.irep != b->body.irep) { fprintf(stderr, "body not copied\n"); bad = 1; }
  if (a->upper != b->upper) { fprintf(stderr, "upper not copied\n"); bad = 1; }
  if (a->e.env != b->e.env) { fprintf(stderr, "env not copied\n"); bad = 1; }
  return bad;
}

/* proof: b's irep already has UINT16_MAX references (b and 65534 other live procs); Proc.new(&b) allocates a
 * and copies b into it: incref raises, and a is collected afterwards, then every other proc */
static int case_refcnt_full(void)
{
  enum { OTHERS = UINT16_MAX - 1 };
  mrb_irep *irep = new_irep();
  struct RProc *b = proc_new(irep, MRB_PROC_STRICT);
  mrb_irep_decref(&M, irep); /* the builder's reference: b now holds the only one */
  struct RProc **others = malloc(OTHERS * sizeof *others);
  for (int i = 0; i < OTHERS; i++) others[i] = proc_new(irep, MRB_PROC_STRICT);
  int bad = expect_u("refcnt before", irep->refcnt, UINT16_MAX);

  struct RProc *a = alloc_proc();
  if (!copy(a, b)) { fprintf(stderr, "copy: want RuntimeError (too many irep references)\n"); bad = 1; }
  else if (M.exc != E_RUNTIME_ERROR) { fprintf(stderr, "copy raised %s\n", M.exc->name); bad = 1; }

  /* the sweep: a (unreachable after the failed copy), the other procs, then b */
  proc_free(a);
  for (int i = 0; i < OTHERS; i++) proc_free(others[i]);
  proc_free(b);
  free(others);
  return bad;
}

/* copying an irep proc: a gets b's flags, body, upper and env, and takes a reference on the irep */
static int case_copy_irep_proc(void)
{
  mrb_irep *irep = new_irep();
  struct RProc *upper = proc_new(irep, 0);
  struct RProc *b = proc_new(irep, MRB_PROC_STRICT | MRB_PROC_ENVSET);
  mrb_irep_decref(&M, irep);
  struct REnv *env = calloc(1, sizeof *env);
  b->upper = upper;
  b->e.env = env;
  struct RProc *a = alloc_proc();
  int bad = 0;
  if (copy(a, b)) { fprintf(stderr, "copy raised %s\n", M.exc->name); bad = 1; }
  bad |= expect_same_proc(a, b);
  bad |= expect_u("refcnt", irep->refcnt, 3);
  proc_free(b); /* a must keep the irep alive on its own reference */
  proc_free(upper);
  bad |= expect_u("refcnt after b and upper", irep->refcnt, 1);
  bad |= expect_u("iseq still readable", irep->iseq[0], 0);
  proc_free(a);
  free(env);
  return bad;
}

/* a chain of copies b -> a -> c: one reference per proc, the irep freed with the last one */
static int case_copy_chain(void)
{
  mrb_irep *irep = new_irep();
  struct RProc *b = proc_new(irep, MRB_PROC_SCOPE);
  mrb_irep_decref(&M, irep);
  struct RProc *a = alloc_proc(), *c = alloc_proc();
  int bad = copy(a, b) | copy(c, a);
  bad |= expect_same_proc(c, b);
  bad |= expect_u("refcnt", irep->refcnt, 3);
  proc_free(a);
  proc_free(b);
  bad |= expect_u("refcnt with c alone", irep->refcnt, 1);
  proc_free(c);
  return bad;
}

static mrb_value cfunc(mrb_state *mrb, mrb_value self) { (void)mrb; return self; }

/* copying a C-function proc: body.func copied, no irep reference taken */
static int case_copy_cfunc_proc(void)
{
  struct RProc *b = alloc_proc();
  b->flags = MRB_PROC_CFUNC_FL | MRB_PROC_STRICT;
  b->body.func = cfunc;
  struct RProc *a = alloc_proc();
  int bad = 0;
  if (copy(a, b)) { fprintf(stderr, "copy raised %s\n", M.exc->name); bad = 1; }
  bad |= expect_same_proc(a, b);
  if (a->body.func != cfunc) { fprintf(stderr, "func not copied\n"); bad = 1; }
  proc_free(a);
  proc_free(b);
  return bad;
}

/* an already initialized proc is left as it is */
static int case_already_initialized(void)
{
  mrb_irep *irep1 = new_irep(), *irep2 = new_irep();
  struct RProc *a = proc_new(irep1, MRB_PROC_STRICT);
  struct RProc *b = proc_new(irep2, MRB_PROC_SCOPE);
  mrb_irep_decref(&M, irep1);
  mrb_irep_decref(&M, irep2);
  int bad = 0;
  if (copy(a, b)) { fprintf(stderr, "copy raised %s\n", M.exc->name); bad = 1; }
  if (a->body.irep != irep1) { fprintf(stderr, "body replaced\n"); bad = 1; }
  bad |= expect_u("flags", a->flags, MRB_PROC_STRICT);
  bad |= expect_u("refcnt irep1", irep1->refcnt, 1);
  bad |= expect_u("refcnt irep2", irep2->refcnt, 1);
  proc_free(a);
  proc_free(b);
  return bad;
}

int main(int argc, char **argv)
{
  static const struct { const char *name; int (*run)(void); } cases[] = {
    {"refcnt_full", case_refcnt_full},
    {"copy_irep_proc", case_copy_irep_proc},
    {"copy_chain", case_copy_chain},
    {"copy_cfunc_proc", case_copy_cfunc_proc},
    {"already_initialized", case_already_initialized},
  };
  if (argc < 2) return 2;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    if (!strcmp(argv[1], cases[i].name)) return cases[i].run();
  return 2;
}
