// Harness for tensorflow TensorByteSize (tensorflow/core/framework/attr_value_util.cc,
// CVE-2022-23582). Stand-ins for TensorProto / TensorShapeProto, for TensorShape and
// PartialTensorShape built from a proto (tensor_shape.cc: the proto constructor calls AddDim,
// which CHECK-fails on a negative size unless the shape is partial), and for DataTypeSize.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace tensorflow {

// LOG(FATAL)-style CHECK: print and abort, as TensorFlow's CHECK does.
#define CHECK_OP_(a, op, b)                                                          \
  do {                                                                               \
    long long va_ = (long long)(a), vb_ = (long long)(b);                            \
    if (!(va_ op vb_)) {                                                             \
      fprintf(stderr, "F tensor_shape.cc] Check failed: %s %s %s (%lld vs. %lld)\n", \
              #a, #op, #b, va_, vb_);                                                \
      abort();                                                                       \
    }                                                                                \
  } while (0)
#define CHECK_GE(a, b) CHECK_OP_(a, >=, b)
#define CHECK_LT(a, b) CHECK_OP_(a, <, b)
#define CHECK_LE(a, b) CHECK_OP_(a, <=, b)
#define CHECK(c)                                                         \
  do {                                                                   \
    if (!(c)) {                                                          \
      fprintf(stderr, "F tensor_shape.cc] Check failed: %s\n", #c);      \
      abort();                                                           \
    }                                                                    \
  } while (0)

enum DataType {
  DT_INVALID = 0, DT_FLOAT = 1, DT_DOUBLE = 2, DT_INT32 = 3, DT_UINT8 = 4, DT_INT16 = 5,
  DT_INT8 = 6, DT_STRING = 7, DT_COMPLEX64 = 8, DT_INT64 = 9, DT_BOOL = 10,
  DT_BFLOAT16 = 14, DT_HALF = 19, DT_RESOURCE = 20, DT_VARIANT = 21,
};

// types.cc: sizeof the C++ type for POD types, 0 for string / resource / variant.
int DataTypeSize(DataType dt) {
  switch (dt) {
    case DT_FLOAT: return 4;
    case DT_DOUBLE: return 8;
    case DT_INT32: return 4;
    case DT_UINT8: return 1;
    case DT_INT16: return 2;
    case DT_INT8: return 1;
    case DT_COMPLEX64: return 8;
    case DT_INT64: return 8;
    case DT_BOOL: return 1;
    case DT_BFLOAT16: return 2;
    case DT_HALF: return 2;
    default: return 0;
  }
}

struct TensorShapeProto {
  struct Dim {
    int64_t size_;
    int64_t size() const { return size_; }
  };
  std::vector<Dim> dims_;
  bool unknown_rank_ = false;
  const std::vector<Dim>& dim() const { return dims_; }
  int dim_size() const { return (int)dims_.size(); }
  bool unknown_rank() const { return unknown_rank_; }
};

struct TensorProto {
  DataType dtype_ = DT_INVALID;
  TensorShapeProto shape_;
  DataType dtype() const { return dtype_; }
  const TensorShapeProto& tensor_shape() const { return shape_; }
};

// util/overflow.h
inline int64_t MultiplyWithoutOverflow(const int64_t x, const int64_t y) {
  const uint64_t ux = x;
  const uint64_t uy = y;
  const uint64_t uxy = ux * uy;
  if ((ux | uy) >> 32 != 0) {
    CHECK(x >= 0 && y >= 0);
    if (ux != 0 && uxy / ux != uy) return -1;
  }
  return static_cast<int64_t>(uxy);
}

// tensor_shape.{h,cc}: the dims are a vector instead of the packed REP16/REP32/out-of-line
// representations; the proto constructor and AddDim keep their checks.
template <bool kIsPartial>
class TensorShapeBase {
 public:
  static constexpr int MaxDimensions() { return 254; }
  explicit TensorShapeBase(const TensorShapeProto& proto) {
    if (kIsPartial && proto.unknown_rank()) {
      unknown_rank_ = true;
      num_elements_ = -1;
    } else {
      num_elements_ = 1;
      for (const auto& d : proto.dim()) {
        AddDim(d.size());
      }
    }
  }
  void AddDim(int64_t size) {
    if (!kIsPartial) CHECK_GE(size, 0);
    if (unknown_rank_) return;
    CHECK_LT((int)dims_.size(), MaxDimensions());
    int64_t new_num_elements;
    if (kIsPartial && (num_elements_ < 0 || size < 0)) {
      new_num_elements = -1;
    } else {
      new_num_elements = MultiplyWithoutOverflow(num_elements_, size);
      CHECK_LE(0, new_num_elements);
    }
    dims_.push_back(kIsPartial && size < 0 ? -1 : size);
    num_elements_ = new_num_elements;
  }
  int64_t num_elements() const { return num_elements_; }

 private:
  std::vector<int64_t> dims_;
  bool unknown_rank_ = false;
  int64_t num_elements_ = 1;
};

class TensorShape : public TensorShapeBase<false> {
 public:
  using TensorShapeBase<false>::TensorShapeBase;
};
class PartialTensorShape : public TensorShapeBase<true> {
 public:
  using TensorShapeBase<true>::TensorShapeBase;
};

#include "function.cpp"

}  // namespace tensorflow

// ---- driver -----------------------------------------------------------------------------------

using tensorflow::DataType;
using tensorflow::TensorProto;

static TensorProto make(DataType dt, std::vector<int64_t> dims, bool unknown_rank = false) {
  TensorProto t;
  t.dtype_ = dt;
  for (int64_t d : dims) t.shape_.dims_.push_back({d});
  t.shape_.unknown_rank_ = unknown_rank;
  return t;
}

static int expect(const TensorProto& t, int64_t want) {
  int64_t got = tensorflow::TensorByteSize(t);
  if (got != want) {
    fprintf(stderr, "TensorByteSize = %lld, want %lld\n", (long long)got, (long long)want);
    return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  using namespace tensorflow;
  if (argc < 2) return 2;
  const char* c = argv[1];
  if (!strcmp(c, "partial_shape")) {
    // a SavedModel tensor whose shape has an unknown (-1) dimension: the size is unknown, -1
    return expect(make(DT_FLOAT, {4, -1}), -1);
  }
  if (!strcmp(c, "fully_defined")) {
    return expect(make(DT_FLOAT, {2, 3}), 24) | expect(make(DT_INT8, {3, 4, 5}), 60);
  }
  if (!strcmp(c, "scalar")) {
    return expect(make(DT_DOUBLE, {}), 8) | expect(make(DT_INT16, {}), 2);
  }
  if (!strcmp(c, "zero_elements")) {
    return expect(make(DT_INT64, {0, 7}), 0);
  }
  if (!strcmp(c, "unknown_rank")) {
    return expect(make(DT_FLOAT, {}, true), -1);
  }
  if (!strcmp(c, "non_pod_dtype")) {
    return expect(make(DT_STRING, {5}), 0) | expect(make(DT_INT32, {1000, 1000}), 4000000);
  }
  return 2;
}
