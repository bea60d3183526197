// Harness for hermes evalUnaryOperator (lib/IR/IREval.cpp, CVE-2021-24045).
// Stand-ins for the IR literal classes, llvh's dyn_cast, IRBuilder's literal factory,
// UnaryOperatorInst::OpKind and evalIsTrue/evalIsFalse (copied in meaning from IREval.cpp).
// llvm_unreachable is the release-build definition (LLVM_BUILTIN_UNREACHABLE), under which
// reaching it is undefined behaviour -- the type confusion of the CVE; UBSan reports it.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#define llvm_unreachable(msg) __builtin_unreachable()

namespace llvh {
template <class To, class From>
To *dyn_cast(From *v) {
  return To::classof(v) ? static_cast<To *>(v) : nullptr;
}
template <class To, class From>
To *cast(From *v) {
  return static_cast<To *>(v);
}
} // namespace llvh

namespace hermes {

enum class ValueKind {
  GlobalObjectKind,
  LiteralEmptyKind,
  LiteralUndefinedKind,
  LiteralNullKind,
  LiteralBoolKind,
  LiteralNumberKind,
  LiteralStringKind,
};

class Literal {
  ValueKind kind_;

 public:
  explicit Literal(ValueKind k) : kind_(k) {}
  virtual ~Literal() = default;
  ValueKind getKind() const { return kind_; }
};

class LiteralNumber : public Literal {
  double value_;

 public:
  explicit LiteralNumber(double v) : Literal(ValueKind::LiteralNumberKind), value_(v) {}
  double getValue() const { return value_; }
  static bool classof(const Literal *v) { return v->getKind() == ValueKind::LiteralNumberKind; }
};

class LiteralBool : public Literal {
  bool value_;

 public:
  explicit LiteralBool(bool v) : Literal(ValueKind::LiteralBoolKind), value_(v) {}
  bool getValue() const { return value_; }
  static bool classof(const Literal *v) { return v->getKind() == ValueKind::LiteralBoolKind; }
};

struct Identifier {
  std::string s;
  const std::string &str() const { return s; }
};

class LiteralString : public Literal {
  Identifier value_;

 public:
  explicit LiteralString(std::string v) : Literal(ValueKind::LiteralStringKind), value_{std::move(v)} {}
  const Identifier &getValue() const { return value_; }
  static bool classof(const Literal *v) { return v->getKind() == ValueKind::LiteralStringKind; }
};

// Owns every literal it hands out (the real one uniques them in the Module).
class IRBuilder {
  std::vector<std::unique_ptr<Literal>> owned_;
  template <class T, class... A>
  T *make(A &&...a) {
    owned_.push_back(std::unique_ptr<Literal>(new T(std::forward<A>(a)...)));
    return static_cast<T *>(owned_.back().get());
  }

 public:
  LiteralNumber *getLiteralNumber(double v) { return make<LiteralNumber>(v); }
  LiteralNumber *getLiteralNaN() { return make<LiteralNumber>(std::nan("")); }
  LiteralNumber *getLiteralNegativeZero() { return make<LiteralNumber>(-0.0); }
  LiteralString *getLiteralString(const char *s) { return make<LiteralString>(std::string(s)); }
  LiteralBool *getLiteralBool(bool b) { return make<LiteralBool>(b); }
  Literal *getLiteralUndefined() { return make<Literal>(ValueKind::LiteralUndefinedKind); }
  Literal *getLiteralNull() { return make<Literal>(ValueKind::LiteralNullKind); }
  Literal *getLiteralEmpty() { return make<Literal>(ValueKind::LiteralEmptyKind); }
  Literal *getGlobalObject() { return make<Literal>(ValueKind::GlobalObjectKind); }
};

struct UnaryOperatorInst {
  enum class OpKind {
    DeleteKind, VoidKind, TypeofKind, PlusKind, MinusKind, TildeKind, BangKind, IncKind, DecKind,
  };
};

// IREval.cpp
LiteralBool *evalToBoolean(IRBuilder &builder, Literal *operand) {
  bool value;
  switch (operand->getKind()) {
    case ValueKind::LiteralNullKind:
    case ValueKind::LiteralUndefinedKind:
      value = false;
      break;
    case ValueKind::LiteralBoolKind:
      value = llvh::cast<LiteralBool>(operand)->getValue();
      break;
    case ValueKind::LiteralNumberKind: {
      const auto n = llvh::cast<LiteralNumber>(operand)->getValue();
      value = !std::isnan(n) && n != 0.0;
      break;
    }
    case ValueKind::LiteralStringKind:
      value = !llvh::cast<LiteralString>(operand)->getValue().str().empty();
      break;
    default:
      return nullptr;
  }
  return builder.getLiteralBool(value);
}
bool evalIsTrue(IRBuilder &builder, Literal *operand) {
  if (auto *lit = evalToBoolean(builder, operand))
    return lit->getValue();
  return false;
}
bool evalIsFalse(IRBuilder &builder, Literal *operand) {
  if (auto *lit = evalToBoolean(builder, operand))
    return !lit->getValue();
  return false;
}

Literal *evalUnaryOperator(UnaryOperatorInst::OpKind kind, IRBuilder &builder, Literal *operand);

} // namespace hermes

using namespace hermes;

#include "function.cpp"

// ---- driver -----------------------------------------------------------------------------------

using OpKind = UnaryOperatorInst::OpKind;

static int want_string(OpKind op, IRBuilder &b, Literal *x, const char *s) {
  Literal *r = evalUnaryOperator(op, b, x);
  auto *str = r ? llvh::dyn_cast<LiteralString>(r) : nullptr;
  if (!str || str->getValue().str() != s) {
    fprintf(stderr, "want string \"%s\"\n", s);
    return 1;
  }
  return 0;
}

static int want_number(OpKind op, IRBuilder &b, Literal *x, double v) {
  Literal *r = evalUnaryOperator(op, b, x);
  auto *num = r ? llvh::dyn_cast<LiteralNumber>(r) : nullptr;
  bool ok = num && (std::isnan(v) ? std::isnan(num->getValue())
                                  : num->getValue() == v &&
                                        std::signbit(num->getValue()) == std::signbit(v));
  if (!ok) {
    fprintf(stderr, "want number %g\n", v);
    return 1;
  }
  return 0;
}

static int want_bool(OpKind op, IRBuilder &b, Literal *x, bool v) {
  Literal *r = evalUnaryOperator(op, b, x);
  auto *lb = r ? llvh::dyn_cast<LiteralBool>(r) : nullptr;
  if (!lb || lb->getValue() != v) {
    fprintf(stderr, "want bool %d\n", v);
    return 1;
  }
  return 0;
}

static int want_null(OpKind op, IRBuilder &b, Literal *x) {
  if (evalUnaryOperator(op, b, x) != nullptr) {
    fprintf(stderr, "want no folding (nullptr)\n");
    return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  const char *c = argv[1];
  IRBuilder b;
  if (!strcmp(c, "typeof_empty")) {
    // `typeof` of the empty literal (as in unreachable code after a TDZ check): not foldable
    return want_null(OpKind::TypeofKind, b, b.getLiteralEmpty());
  }
  if (!strcmp(c, "typeof_literals")) {
    return want_string(OpKind::TypeofKind, b, b.getLiteralNull(), "object") |
           want_string(OpKind::TypeofKind, b, b.getGlobalObject(), "object") |
           want_string(OpKind::TypeofKind, b, b.getLiteralUndefined(), "undefined") |
           want_string(OpKind::TypeofKind, b, b.getLiteralBool(true), "boolean") |
           want_string(OpKind::TypeofKind, b, b.getLiteralNumber(3), "number") |
           want_string(OpKind::TypeofKind, b, b.getLiteralString("s"), "string");
  }
  if (!strcmp(c, "minus")) {
    return want_number(OpKind::MinusKind, b, b.getLiteralNumber(5), -5) |
           want_number(OpKind::MinusKind, b, b.getLiteralUndefined(), std::nan("")) |
           want_number(OpKind::MinusKind, b, b.getLiteralBool(true), -1) |
           want_number(OpKind::MinusKind, b, b.getLiteralBool(false), -0.0) |
           want_number(OpKind::MinusKind, b, b.getLiteralNull(), -0.0) |
           want_null(OpKind::MinusKind, b, b.getLiteralString("7"));
  }
  if (!strcmp(c, "bang")) {
    return want_bool(OpKind::BangKind, b, b.getLiteralNumber(0), true) |
           want_bool(OpKind::BangKind, b, b.getLiteralString(""), true) |
           want_bool(OpKind::BangKind, b, b.getLiteralString("a"), false) |
           want_bool(OpKind::BangKind, b, b.getLiteralNull(), true) |
           want_bool(OpKind::BangKind, b, b.getLiteralNumber(std::nan("")), true) |
           want_null(OpKind::BangKind, b, b.getGlobalObject());
  }
  if (!strcmp(c, "void_and_unfolded")) {
    Literal *r = evalUnaryOperator(OpKind::VoidKind, b, b.getLiteralNumber(5));
    int bad = !r || r->getKind() != ValueKind::LiteralUndefinedKind;
    if (bad) fprintf(stderr, "void 5 is not undefined\n");
    return bad | want_null(OpKind::TildeKind, b, b.getLiteralNumber(5)) |
           want_null(OpKind::PlusKind, b, b.getLiteralString("1"));
  }
  return 2;
}
