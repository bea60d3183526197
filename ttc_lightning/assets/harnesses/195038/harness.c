/* Harness for mruby mrb_ary_shift_m (src/array.c, Array#shift(n)), CVE-2021-4188.
 * Stand-ins follow mruby 3.0 (include/mruby/array.h, src/array.c, src/class.c, src/object.c) built with
 * MRB_NO_BOXING and MRB_ARY_NO_EMBED (arrays always keep their elements in as.heap; mruby selects this
 * configuration itself on 32-bit no-boxing builds). Objects are calloc'ed and freed at mrb_close; mrb_raise
 * longjmps; mrb_get_args handles the "|i" format the function uses, converting a non-Integer argument by
 * calling its to_i method (a C callback standing in for the Ruby method), as mrb_as_int -> mrb_to_integer ->
 * mrb_type_convert does. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MRB_API
typedef int64_t mrb_int;
typedef mrb_int mrb_ssize;
typedef uint8_t mrb_bool;

enum mrb_vtype { MRB_TT_FALSE = 0, MRB_TT_TRUE, MRB_TT_INTEGER, MRB_TT_OBJECT, MRB_TT_ARRAY, MRB_TT_STRING };

typedef struct mrb_value {
  union { void *p; mrb_int i; } value;
  enum mrb_vtype tt;
} mrb_value;

struct RClass { const char *name; };

#define MRB_OBJECT_HEADER \
  struct RClass *c; \
  struct RBasic *gcnext; \
  enum mrb_vtype tt:8; \
  uint32_t color:3; \
  uint32_t flags:21

struct RBasic { MRB_OBJECT_HEADER; };
#define MRB_FL_OBJ_IS_FROZEN (1 << 20)
#define mrb_frozen_p(o) ((o)->flags & MRB_FL_OBJ_IS_FROZEN)

typedef struct mrb_state mrb_state;
/* a plain object whose to_i method is the C function to_i */
struct RObject {
  MRB_OBJECT_HEADER;
  mrb_value (*to_i)(mrb_state *, mrb_value self);
  mrb_value ivar; /* whatever to_i needs */
};

struct mrb_jmpbuf { jmp_buf impl; };

struct mrb_state {
  struct mrb_jmpbuf *jmp;
  struct RClass *exc;      /* class of the last raised exception */
  const char *exc_msg;
  mrb_int argc;            /* the current method call's arguments */
  const mrb_value *argv;
  struct RBasic *heap;     /* every object allocated, freed by mrb_close */
  struct RClass *array_class;
};

static struct RClass argument_error = {"ArgumentError"}, frozen_error = {"FrozenError"},
                     type_error = {"TypeError"}, array_class = {"Array"}, object_class = {"Object"};
#define E_ARGUMENT_ERROR (&argument_error)
#define E_FROZEN_ERROR (&frozen_error)
#define E_TYPE_ERROR (&type_error)

static __attribute__((noreturn)) void mrb_raise(mrb_state *mrb, struct RClass *c, const char *msg)
{
  mrb->exc = c;
  mrb->exc_msg = msg;
  longjmp(mrb->jmp->impl, 1);
}

static void *mrb_malloc(mrb_state *mrb, size_t len)
{
  void *p = malloc(len ? len : 1);
  if (!p) { fprintf(stderr, "out of memory\n"); abort(); }
  (void)mrb;
  return p;
}
static void *mrb_realloc(mrb_state *mrb, void *p, size_t len)
{
  void *q = realloc(p, len ? len : 1);
  if (!q) { fprintf(stderr, "out of memory\n"); abort(); }
  (void)mrb;
  return q;
}
static void mrb_free(mrb_state *mrb, void *p) { (void)mrb; free(p); }

static struct RBasic *mrb_obj_alloc(mrb_state *mrb, enum mrb_vtype tt, size_t size, struct RClass *cls)
{
  struct RBasic *p = calloc(1, size); /* mruby zeroes new objects (RVALUE_zero) */
  if (!p) abort();
  p->c = cls;
  p->tt = tt;
  p->gcnext = mrb->heap;
  mrb->heap = p;
  return p;
}
#define MRB_OBJ_ALLOC(mrb, tt, klass) ((struct RArray *)mrb_obj_alloc(mrb, tt, sizeof(struct RArray), klass))

static inline mrb_value mrb_obj_value(void *p)
{
  mrb_value v;
  v.value.p = p;
  v.tt = ((struct RBasic *)p)->tt;
  return v;
}
static inline mrb_value mrb_nil_value(void) { mrb_value v; v.value.i = 0; v.tt = MRB_TT_FALSE; return v; }
static inline mrb_value mrb_int_value(mrb_state *mrb, mrb_int i) { mrb_value v; (void)mrb; v.value.i = i; v.tt = MRB_TT_INTEGER; return v; }
#define mrb_ptr(o) ((o).value.p)
#define mrb_integer(o) ((o).value.i)
#define mrb_integer_p(o) ((o).tt == MRB_TT_INTEGER)
#define mrb_nil_p(o) ((o).tt == MRB_TT_FALSE && !(o).value.i)
#define mrb_string_p(o) ((o).tt == MRB_TT_STRING)

static void mrb_check_frozen(mrb_state *mrb, void *o)
{
  if (mrb_frozen_p((struct RBasic *)o)) mrb_raise(mrb, E_FROZEN_ERROR, "can't modify frozen Array");
}

/* ---- include/mruby/array.h (MRB_ARY_NO_EMBED) ---- */
typedef struct mrb_shared_array {
  int refcnt;
  mrb_ssize len;
  mrb_value *ptr;
} mrb_shared_array;

#define MRB_ARY_NO_EMBED
#define MRB_ARY_EMBED_LEN_MAX 0

struct RArray {
  MRB_OBJECT_HEADER;
  union {
    struct {
      mrb_ssize len;
      union {
        mrb_ssize capa;
        mrb_shared_array *shared;
      } aux;
      mrb_value *ptr;
    } heap;
  } as;
};

#define mrb_ary_ptr(v)    ((struct RArray*)(mrb_ptr(v)))
#define ARY_EMBED_P(a) 0
#define ARY_SET_EMBED_LEN(a,len) (void)0
#define ARY_EMBED_PTR(a) 0
#define ARY_LEN(a) (ARY_EMBED_P(a)?0:(mrb_int)(a)->as.heap.len)
#define ARY_PTR(a) (ARY_EMBED_P(a)?ARY_EMBED_PTR(a):(a)->as.heap.ptr)
#define ARY_SET_LEN(a,n) do {\
  if (ARY_EMBED_P(a)) {\
    ARY_SET_EMBED_LEN(a,n);\
  }\
  else\
    (a)->as.heap.len = (n);\
} while (0)
#define MRB_ARY_SHARED      256
#define ARY_SHARED_P(a) ((a)->flags & MRB_ARY_SHARED)
#define ARY_SET_SHARED_FLAG(a) ((a)->flags |= MRB_ARY_SHARED)
#define ARY_UNSET_SHARED_FLAG(a) ((a)->flags &= ~MRB_ARY_SHARED)

/* ---- src/array.c helpers the function calls ---- */
static struct RArray *ary_new_capa(mrb_state *mrb, mrb_int capa)
{
  struct RArray *a = MRB_OBJ_ALLOC(mrb, MRB_TT_ARRAY, mrb->array_class);
  if (capa <= MRB_ARY_EMBED_LEN_MAX) {
    ARY_SET_EMBED_LEN(a, 0);
  }
  else {
    a->as.heap.ptr = (mrb_value *)mrb_malloc(mrb, capa * sizeof(mrb_value));
    a->as.heap.aux.capa = capa;
    a->as.heap.len = 0;
  }
  return a;
}

MRB_API mrb_value mrb_ary_new_capa(mrb_state *mrb, mrb_int capa) { return mrb_obj_value(ary_new_capa(mrb, capa)); }
MRB_API mrb_value mrb_ary_new(mrb_state *mrb) { return mrb_ary_new_capa(mrb, 0); }

static inline void array_copy(mrb_value *dst, const mrb_value *src, mrb_int size)
{
  for (mrb_int i = 0; i < size; i++) dst[i] = src[i];
}

MRB_API mrb_value mrb_ary_new_from_values(mrb_state *mrb, mrb_int size, const mrb_value *vals)
{
  struct RArray *a = ary_new_capa(mrb, size);
  array_copy(ARY_PTR(a), vals, size);
  ARY_SET_LEN(a, size);
  return mrb_obj_value(a);
}

static void mrb_ary_decref(mrb_state *mrb, mrb_shared_array *shared)
{
  shared->refcnt--;
  if (shared->refcnt == 0) {
    mrb_free(mrb, shared->ptr);
    mrb_free(mrb, shared);
  }
}

static void ary_modify_check(mrb_state *mrb, struct RArray *a) { mrb_check_frozen(mrb, a); }

static void ary_modify(mrb_state *mrb, struct RArray *a)
{
  ary_modify_check(mrb, a);
  if (ARY_SHARED_P(a)) {
    mrb_shared_array *shared = a->as.heap.aux.shared;
    if (shared->refcnt == 1 && a->as.heap.ptr == shared->ptr) {
      a->as.heap.ptr = shared->ptr;
      a->as.heap.aux.capa = a->as.heap.len;
      mrb_free(mrb, shared);
    }
    else {
      mrb_value *ptr, *p;
      p = a->as.heap.ptr;
      ptr = (mrb_value *)mrb_malloc(mrb, a->as.heap.len * sizeof(mrb_value));
      if (p) array_copy(ptr, p, a->as.heap.len);
      a->as.heap.ptr = ptr;
      a->as.heap.aux.capa = a->as.heap.len;
      mrb_ary_decref(mrb, shared);
    }
    ARY_UNSET_SHARED_FLAG(a);
  }
}

static void ary_make_shared(mrb_state *mrb, struct RArray *a)
{
  if (!ARY_SHARED_P(a) && !ARY_EMBED_P(a)) {
    mrb_shared_array *shared = (mrb_shared_array *)mrb_malloc(mrb, sizeof(mrb_shared_array));
    mrb_value *ptr = a->as.heap.ptr;
    mrb_int len = a->as.heap.len;

    shared->refcnt = 1;
    if (a->as.heap.aux.capa > len) {
      a->as.heap.ptr = shared->ptr = (mrb_value *)mrb_realloc(mrb, ptr, sizeof(mrb_value)*len+1);
    }
    else {
      shared->ptr = ptr;
    }
    shared->len = len;
    a->as.heap.aux.shared = shared;
    ARY_SET_SHARED_FLAG(a);
  }
}

#define ARY_SHIFT_SHARED_MIN 10

MRB_API mrb_value mrb_ary_shift(mrb_state *mrb, mrb_value self)
{
  struct RArray *a = mrb_ary_ptr(self);
  mrb_int len = ARY_LEN(a);
  mrb_value val;

  ary_modify_check(mrb, a);
  if (len == 0) return mrb_nil_value();
  if (ARY_SHARED_P(a)) {
  L_SHIFT:
    val = a->as.heap.ptr[0];
    a->as.heap.ptr++;
    a->as.heap.len--;
    return val;
  }
  if (len > ARY_SHIFT_SHARED_MIN) {
    ary_make_shared(mrb, a);
    goto L_SHIFT;
  }
  else {
    mrb_value *ptr = ARY_PTR(a);
    mrb_int size = len;

    val = *ptr;
    while (--size) {
      *ptr = *(ptr+1);
      ++ptr;
    }
    ARY_SET_LEN(a, len-1);
  }
  return val;
}

/* Array#clear (MRB_ARY_NO_EMBED branch: the buffer is freed and ptr set to NULL) */
MRB_API mrb_value mrb_ary_clear(mrb_state *mrb, mrb_value self)
{
  struct RArray *a = mrb_ary_ptr(self);

  ary_modify(mrb, a);
  if (ARY_SHARED_P(a)) {
    mrb_ary_decref(mrb, a->as.heap.aux.shared);
    ARY_UNSET_SHARED_FLAG(a);
  }
  else if (!ARY_EMBED_P(a)) {
    mrb_free(mrb, a->as.heap.ptr);
  }
  a->as.heap.ptr = NULL;
  a->as.heap.aux.capa = 0;
  ARY_SET_LEN(a, 0);
  return self;
}

/* ---- src/object.c / src/class.c: argument conversion ---- */
static mrb_value mrb_to_integer(mrb_state *mrb, mrb_value val)
{
  if (!mrb_integer_p(val)) {
    if (mrb_string_p(val)) mrb_raise(mrb, E_TYPE_ERROR, "can't convert String to Integer");
    if (val.tt != MRB_TT_OBJECT || !((struct RObject *)mrb_ptr(val))->to_i)
      mrb_raise(mrb, E_TYPE_ERROR, "can't convert into Integer");
    /* mrb_type_convert: calls the object's to_i, which is arbitrary Ruby code */
    mrb_value v = ((struct RObject *)mrb_ptr(val))->to_i(mrb, val);
    if (!mrb_integer_p(v)) mrb_raise(mrb, E_TYPE_ERROR, "can't convert to Integer (to_i gives non-Integer)");
    return v;
  }
  return val;
}
#define mrb_as_int(mrb, val) mrb_integer(mrb_to_integer(mrb, val))

typedef const char *mrb_args_format;
static mrb_int mrb_get_args(mrb_state *mrb, mrb_args_format format, ...)
{
  va_list ap;
  mrb_int got = 0;
  if (strcmp(format, "|i") != 0) { fprintf(stderr, "stand-in mrb_get_args: format %s\n", format); abort(); }
  if (mrb->argc > 1) mrb_raise(mrb, E_ARGUMENT_ERROR, "wrong number of arguments");
  va_start(ap, format);
  mrb_int *p = va_arg(ap, mrb_int *);
  if (mrb->argc == 1) {
    *p = mrb_as_int(mrb, mrb->argv[0]);
    got = 1;
  }
  va_end(ap);
  return got;
}

static void mrb_close(mrb_state *mrb)
{
  struct RBasic *o = mrb->heap;
  while (o) {
    struct RBasic *next = o->gcnext;
    if (o->tt == MRB_TT_ARRAY) {
      struct RArray *a = (struct RArray *)o;
      if (ARY_SHARED_P(a)) mrb_ary_decref(mrb, a->as.heap.aux.shared);
      else mrb_free(mrb, a->as.heap.ptr);
    }
    free(o);
    o = next;
  }
  mrb->heap = NULL;
}

/* the record's func starts at the name: its return type, on the line above in array.c, is given here */
static mrb_value
#include "function.c"

/* ---- driver ---- */

static mrb_state M;

static mrb_value ary_of(mrb_int from, mrb_int count)
{
  struct RArray *a = ary_new_capa(&M, count);
  for (mrb_int i = 0; i < count; i++) a->as.heap.ptr[i] = mrb_int_value(&M, from + i);
  a->as.heap.len = count;
  return mrb_obj_value(a);
}

/* checks that v is an Array holding from, from+1, ..., from+count-1 */
static int expect_ary(const char *what, mrb_value v, mrb_int from, mrb_int count)
{
  if (v.tt != MRB_TT_ARRAY) { fprintf(stderr, "%s: not an Array (tt %d)\n", what, v.tt); return 1; }
  struct RArray *a = mrb_ary_ptr(v);
  if (ARY_LEN(a) != count) {
    fprintf(stderr, "%s: length %lld, want %lld\n", what, (long long)ARY_LEN(a), (long long)count);
    return 1;
  }
  for (mrb_int i = 0; i < count; i++) {
    mrb_value e = ARY_PTR(a)[i];
    if (!mrb_integer_p(e) || mrb_integer(e) != from + i) {
      fprintf(stderr, "%s[%lld]: want %lld\n", what, (long long)i, (long long)(from + i));
      return 1;
    }
  }
  return 0;
}

/* calls self.shift(*args); returns 1 and sets *exc when it raised */
static int call_shift(mrb_value self, mrb_int argc, const mrb_value *argv, mrb_value *out, struct RClass **exc)
{
  struct mrb_jmpbuf jb;
  M.jmp = &jb;
  M.argc = argc;
  M.argv = argv;
  M.exc = NULL;
  if (setjmp(jb.impl) == 0) {
    *out = mrb_ary_shift_m(&M, self);
    M.jmp = NULL;
    return 0;
  }
  M.jmp = NULL;
  *exc = M.exc;
  return 1;
}

static int shift_ok(const char *what, mrb_value self, mrb_int argc, const mrb_value *argv, mrb_value *out)
{
  struct RClass *exc = NULL;
  if (call_shift(self, argc, argv, out, &exc)) {
    fprintf(stderr, "%s: raised %s (%s)\n", what, exc->name, M.exc_msg);
    return 1;
  }
  return 0;
}

static mrb_value new_object(mrb_value (*to_i)(mrb_state *, mrb_value), mrb_value ivar)
{
  struct RObject *o = (struct RObject *)mrb_obj_alloc(&M, MRB_TT_OBJECT, sizeof(struct RObject), &object_class);
  o->to_i = to_i;
  o->ivar = ivar;
  return mrb_obj_value(o);
}

/* def o.to_i; $a.clear; 2; end */
static mrb_value to_i_clearing(mrb_state *mrb, mrb_value self)
{
  mrb_ary_clear(mrb, ((struct RObject *)mrb_ptr(self))->ivar);
  return mrb_int_value(mrb, 2);
}
/* def o.to_i; 2; end */
static mrb_value to_i_two(mrb_state *mrb, mrb_value self) { (void)self; return mrb_int_value(mrb, 2); }

/* proof: a = [1,2,3,4,5]; a.shift(o) where o.to_i clears a: the result must be [] and a stay empty */
static int case_to_i_clears(void)
{
  mrb_value a = ary_of(1, 5), r;
  mrb_value arg = new_object(to_i_clearing, a);
  int bad = shift_ok("shift", a, 1, &arg, &r);
  if (!bad) bad = expect_ary("result", r, 0, 0) | expect_ary("a", a, 0, 0);
  mrb_close(&M);
  return bad;
}

/* a.shift with no argument: the first element, a keeps the rest */
static int case_shift_one(void)
{
  mrb_value a = ary_of(1, 3), r;
  int bad = shift_ok("shift", a, 0, NULL, &r);
  if (!bad && (!mrb_integer_p(r) || mrb_integer(r) != 1)) { fprintf(stderr, "shift: want 1\n"); bad = 1; }
  if (!bad) bad = expect_ary("a", a, 2, 2);
  mrb_close(&M);
  return bad;
}

/* [1,2,3,4,5].shift(2) -> [1,2], a = [3,4,5] */
static int case_shift_n(void)
{
  mrb_value a = ary_of(1, 5), r, n = mrb_int_value(&M, 2);
  int bad = shift_ok("shift(2)", a, 1, &n, &r);
  if (!bad) bad = expect_ary("result", r, 1, 2) | expect_ary("a", a, 3, 3);
  mrb_close(&M);
  return bad;
}

/* [1,2,3].shift(5) -> [1,2,3], a = []; then a.shift(1) -> [] */
static int case_shift_over_len(void)
{
  mrb_value a = ary_of(1, 3), r, n = mrb_int_value(&M, 5), one = mrb_int_value(&M, 1);
  int bad = shift_ok("shift(5)", a, 1, &n, &r);
  if (!bad) bad = expect_ary("result", r, 1, 3) | expect_ary("a", a, 0, 0);
  if (!bad) bad = shift_ok("shift(1) of []", a, 1, &one, &r);
  if (!bad) bad = expect_ary("result of []", r, 0, 0);
  mrb_close(&M);
  return bad;
}

/* a long array (over ARY_SHIFT_SHARED_MIN) is shifted by sharing its buffer: twice */
static int case_shift_shared(void)
{
  mrb_value a = ary_of(1, 12), r, n3 = mrb_int_value(&M, 3), n2 = mrb_int_value(&M, 2);
  int bad = shift_ok("shift(3)", a, 1, &n3, &r);
  if (!bad) bad = expect_ary("result", r, 1, 3) | expect_ary("a", a, 4, 9);
  if (!bad) bad = shift_ok("shift(2)", a, 1, &n2, &r);
  if (!bad) bad = expect_ary("second result", r, 4, 2) | expect_ary("a after second", a, 6, 7);
  mrb_close(&M);
  return bad;
}

/* an argument converted by to_i: o.to_i == 2 -> [1,2] */
static int case_shift_to_i(void)
{
  mrb_value a = ary_of(1, 4), r;
  mrb_value arg = new_object(to_i_two, mrb_nil_value());
  int bad = shift_ok("shift(o)", a, 1, &arg, &r);
  if (!bad) bad = expect_ary("result", r, 1, 2) | expect_ary("a", a, 3, 2);
  mrb_close(&M);
  return bad;
}

/* shift(-1) raises ArgumentError; shift(1) of a frozen array raises FrozenError; a unchanged */
static int case_shift_errors(void)
{
  mrb_value a = ary_of(1, 4), r, neg = mrb_int_value(&M, -1), one = mrb_int_value(&M, 1);
  struct RClass *exc = NULL;
  int bad = 0;
  if (!call_shift(a, 1, &neg, &r, &exc) || exc != E_ARGUMENT_ERROR) {
    fprintf(stderr, "shift(-1): want ArgumentError\n");
    bad = 1;
  }
  bad |= expect_ary("a after shift(-1)", a, 1, 4);
  mrb_ary_ptr(a)->flags |= MRB_FL_OBJ_IS_FROZEN;
  exc = NULL;
  if (!call_shift(a, 1, &one, &r, &exc) || exc != E_FROZEN_ERROR) {
    fprintf(stderr, "frozen shift(1): want FrozenError\n");
    bad = 1;
  }
  bad |= expect_ary("frozen a", a, 1, 4);
  mrb_close(&M);
  return bad;
}

int main(int argc, char **argv)
{
  static const struct { const char *name; int (*run)(void); } cases[] = {
    {"to_i_clears", case_to_i_clears},
    {"shift_one", case_shift_one},
    {"shift_n", case_shift_n},
    {"shift_over_len", case_shift_over_len},
    {"shift_shared", case_shift_shared},
    {"shift_to_i", case_shift_to_i},
    {"shift_errors", case_shift_errors},
  };
  M.array_class = &array_class;
  if (argc < 2) return 2;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    if (!strcmp(argv[1], cases[i].name)) return cases[i].run();
  return 2;
}
