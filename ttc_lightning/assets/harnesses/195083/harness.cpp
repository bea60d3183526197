// Harness for tensorflow Tensor::FromProto (tensorflow/core/framework/tensor.cc, CVE-2022-23571).
// Stand-ins: TensorProto / TensorShapeProto as plain structs with the accessors the function uses; TensorShape
// with TensorFlow's IsValid(proto), proto constructor and num_elements, and the Tensor's dtype kept, as in
// TensorShapeRep, in one byte of the shape set through set_data_type and its DCHECK_LT(dt, 256u); a refcounted
// TensorBuffer / Buffer<T> allocated through an Allocator; Helper<T>::Decode, FromProtoField<T>, ProtoHelper<T>
// and the CASE / CASES_WITH_DEFAULT dispatch copied in meaning from tensor.cc (the POD dtypes only).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace tensorflow {

typedef int64_t int64;
typedef uint32_t uint32;
typedef uint8_t uint8;

// CHECK / DCHECK print and abort like LOG(FATAL). DCHECKs are on, as in a debug (-c dbg) build.
#define TF_CHECK_(cond, text)                                        \
  do {                                                               \
    if (!(cond)) {                                                   \
      fprintf(stderr, "F tensorflow] Check failed: %s\n", text);     \
      abort();                                                       \
    }                                                                \
  } while (0)
#define CHECK_NOTNULL(p) TF_CHECK_((p) != nullptr, "'" #p "' Must be non NULL")
#define CHECK_GT(a, b) TF_CHECK_((a) > (b), #a " > " #b)
#define DCHECK_LT(a, b) TF_CHECK_((a) < (b), #a " < " #b)

// types.proto: the proto enum is open (a TensorProto may carry any int32 in its dtype field)
enum DataType : int {
  DT_INVALID = 0, DT_FLOAT = 1, DT_DOUBLE = 2, DT_INT32 = 3, DT_UINT8 = 4, DT_INT16 = 5, DT_INT8 = 6,
  DT_STRING = 7, DT_COMPLEX64 = 8, DT_INT64 = 9, DT_BOOL = 10, DT_QINT8 = 11, DT_QUINT8 = 12, DT_QINT32 = 13,
  DT_BFLOAT16 = 14, DT_QINT16 = 15, DT_QUINT16 = 16, DT_UINT16 = 17, DT_COMPLEX128 = 18, DT_HALF = 19,
  DT_RESOURCE = 20, DT_VARIANT = 21, DT_UINT32 = 22, DT_UINT64 = 23,
  DT_FLOAT_REF = 101,
};

template <typename T> struct DataTypeToEnum;
#define MATCH_TYPE_AND_ENUM(TYPE, ENUM) \
  template <> struct DataTypeToEnum<TYPE> { static constexpr DataType value = ENUM; }
MATCH_TYPE_AND_ENUM(float, DT_FLOAT);
MATCH_TYPE_AND_ENUM(double, DT_DOUBLE);
MATCH_TYPE_AND_ENUM(int32_t, DT_INT32);
MATCH_TYPE_AND_ENUM(uint8_t, DT_UINT8);
MATCH_TYPE_AND_ENUM(uint16_t, DT_UINT16);
MATCH_TYPE_AND_ENUM(uint32_t, DT_UINT32);
MATCH_TYPE_AND_ENUM(uint64_t, DT_UINT64);
MATCH_TYPE_AND_ENUM(int16_t, DT_INT16);
MATCH_TYPE_AND_ENUM(int8_t, DT_INT8);
MATCH_TYPE_AND_ENUM(int64_t, DT_INT64);
MATCH_TYPE_AND_ENUM(bool, DT_BOOL);

struct TensorShapeProto {
  struct Dim {
    int64 size_;
    int64 size() const { return size_; }
  };
  std::vector<Dim> dims_;
  bool unknown_rank_ = false;
  const std::vector<Dim>& dim() const { return dims_; }
  bool unknown_rank() const { return unknown_rank_; }
};

struct TensorProto {
  int dtype_ = DT_INVALID;
  TensorShapeProto shape_;
  std::string tensor_content_;
  std::vector<float> float_val_;
  std::vector<double> double_val_;
  std::vector<int32_t> int_val_;
  std::vector<int64_t> int64_val_;
  std::vector<bool> bool_val_;
  std::vector<uint32_t> uint32_val_;
  std::vector<uint64_t> uint64_val_;
  DataType dtype() const { return static_cast<DataType>(dtype_); }
  const TensorShapeProto& tensor_shape() const { return shape_; }
  const std::string& tensor_content() const { return tensor_content_; }
};

// util/overflow.h
inline int64 MultiplyWithoutOverflow(const int64 x, const int64 y) {
  const uint64_t ux = x, uy = y, uxy = ux * uy;
  if ((ux | uy) >> 32 != 0) {
    if (x < 0 || y < 0) return -1;
    if (ux != 0 && uxy / ux != uy) return -1;
  }
  return static_cast<int64>(uxy);
}

class Tensor;

// tensor_shape.{h,cc}: dims in a vector instead of the packed representations; the data type in one byte.
class TensorShape {
 public:
  static constexpr int MaxDimensions() { return 254; }
  TensorShape() = default;
  explicit TensorShape(const TensorShapeProto& proto) {
    for (const auto& d : proto.dim()) AddDim(d.size());
  }
  static bool IsValid(const TensorShapeProto& proto) {
    if (proto.unknown_rank()) return false;  // a TensorShape must be fully defined
    int64 num_elements = 1;
    if ((int)proto.dim().size() > MaxDimensions()) return false;
    for (const auto& d : proto.dim()) {
      if (d.size() < 0) return false;
      num_elements = MultiplyWithoutOverflow(num_elements, d.size());
      if (num_elements < 0) return false;
    }
    return true;
  }
  void AddDim(int64 size) {
    TF_CHECK_(size >= 0, "size >= 0");
    int64 n = MultiplyWithoutOverflow(num_elements_, size);
    TF_CHECK_(n >= 0, "0 <= new_num_elements");
    dims_.push_back(size);
    num_elements_ = n;
  }
  int64 num_elements() const { return num_elements_; }
  int dims() const { return (int)dims_.size(); }
  int64 dim_size(int d) const { return dims_[d]; }

 private:
  friend class Tensor;
  DataType data_type() const { return static_cast<DataType>(data_type_); }
  void set_data_type(DataType dt) {
    // We only have 8 bits available to store DataType, so make sure it fits
    DCHECK_LT(static_cast<uint32>(dt), 256u);
    data_type_ = static_cast<uint8>(dt);
  }
  std::vector<int64> dims_;
  int64 num_elements_ = 1;
  uint8 data_type_ = DT_INVALID;
};

// framework/allocator.h: raw allocations, counted so the driver can see them all returned
struct Allocator {
  int live = 0;
  void* AllocateRaw(size_t bytes) {
    ++live;
    return malloc(bytes ? bytes : 1);
  }
  void DeallocateRaw(void* p) {
    --live;
    free(p);
  }
};

// framework/tensor.h: a refcounted buffer
class TensorBuffer {
 public:
  explicit TensorBuffer(void* data) : data_(data) {}
  virtual ~TensorBuffer() {}
  void* data() const { return data_; }
  template <typename T> T* base() const { return reinterpret_cast<T*>(data_); }
  void Ref() { ++refs_; }
  void Unref() {
    if (--refs_ == 0) delete this;
  }

 private:
  void* data_;
  int refs_ = 1;
};

inline void UnrefIfNonNull(TensorBuffer* buf) {
  if (buf) buf->Unref();
}

template <typename T>
class Buffer : public TensorBuffer {
 public:
  Buffer(Allocator* a, int64 n) : TensorBuffer(a->AllocateRaw(sizeof(T) * n)), alloc_(a) {}
  ~Buffer() override { alloc_->DeallocateRaw(data()); }

 private:
  Allocator* alloc_;
};

static bool memory_logging = false;
static int recorded_allocations = 0;
inline bool MemoryLoggingEnabled() { return memory_logging; }
struct LogMemory {
  static constexpr int64 UNKNOWN_STEP_ID = -3;
  static void RecordTensorAllocation(const std::string&, int64, const Tensor&) { ++recorded_allocations; }
};

// tensor.cc: Helper<T> for the simple (POD) types
template <typename T>
struct Helper {
  static TensorBuffer* Decode(Allocator* a, const std::string& in, int64 n) {
    if (in.size() != sizeof(T) * n) {
      fprintf(stderr, "W tensor.cc] Input size was %zu and expected %lld\n", in.size(),
              (long long)(sizeof(T) * n));
      return nullptr;
    }
    Buffer<T>* buf = new Buffer<T>(a, n);
    char* data = buf->template base<char>();
    if (data == nullptr) {
      buf->Unref();
      return nullptr;
    }
    memcpy(data, in.data(), in.size());
    return buf;
  }
};

// tensor.cc: ProtoHelper<T>, the typed repeated field each dtype reads its values from
template <typename T> struct ProtoHelper;
#define PROTO_HELPER(TYPE, FIELD)                                                          \
  template <> struct ProtoHelper<TYPE> {                                                   \
    static int64 NumElements(const TensorProto& t) { return (int64)t.FIELD.size(); }       \
    static TYPE Get(const TensorProto& t, int64 i) { return static_cast<TYPE>(t.FIELD[i]); } \
  }
PROTO_HELPER(float, float_val_);
PROTO_HELPER(double, double_val_);
PROTO_HELPER(int32_t, int_val_);
PROTO_HELPER(uint8_t, int_val_);
PROTO_HELPER(uint16_t, int_val_);
PROTO_HELPER(int16_t, int_val_);
PROTO_HELPER(int8_t, int_val_);
PROTO_HELPER(int64_t, int64_val_);
PROTO_HELPER(bool, bool_val_);
PROTO_HELPER(uint32_t, uint32_val_);
PROTO_HELPER(uint64_t, uint64_val_);

// tensor.cc: T[n] from the typed field; missing trailing values repeat the last one, no values give T()
template <typename T>
TensorBuffer* FromProtoField(Allocator* a, const TensorProto& in, int64 n) {
  CHECK_GT(n, 0);
  Buffer<T>* buf = new Buffer<T>(a, n);
  T* data = buf->template base<T>();
  if (data == nullptr) {
    buf->Unref();
    return nullptr;
  }
  const int64 in_n = ProtoHelper<T>::NumElements(in);
  if (in_n <= 0) {
    std::fill_n(data, n, T());
  } else {
    int64 i = 0;
    for (; i < std::min(n, in_n); ++i) data[i] = ProtoHelper<T>::Get(in, i);
    for (; i < n; ++i) data[i] = data[in_n - 1];
  }
  return buf;
}

// tensor.cc
#define SINGLE_ARG(...) __VA_ARGS__
#define CASE(TYPE, STMTS)             \
  case DataTypeToEnum<TYPE>::value: { \
    typedef TYPE T;                   \
    STMTS;                            \
    break;                            \
  }
#define CASES_WITH_DEFAULT(TYPE_ENUM, STMTS, INVALID, DEFAULT) \
  switch (TYPE_ENUM) {                                         \
    CASE(float, SINGLE_ARG(STMTS))                             \
    CASE(double, SINGLE_ARG(STMTS))                            \
    CASE(int32_t, SINGLE_ARG(STMTS))                           \
    CASE(uint8_t, SINGLE_ARG(STMTS))                           \
    CASE(uint16_t, SINGLE_ARG(STMTS))                          \
    CASE(uint32_t, SINGLE_ARG(STMTS))                          \
    CASE(uint64_t, SINGLE_ARG(STMTS))                          \
    CASE(int16_t, SINGLE_ARG(STMTS))                           \
    CASE(int8_t, SINGLE_ARG(STMTS))                            \
    CASE(int64_t, SINGLE_ARG(STMTS))                           \
    CASE(bool, SINGLE_ARG(STMTS))                              \
    case DT_INVALID:                                           \
      INVALID;                                                 \
      break;                                                   \
    default:                                                   \
      DEFAULT;                                                 \
      break;                                                   \
  }

class Tensor {
 public:
  Tensor() { set_dtype(DT_FLOAT); }
  ~Tensor() { UnrefIfNonNull(buf_); }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  bool FromProto(Allocator* a, const TensorProto& proto);

  DataType dtype() const { return shape_.data_type(); }
  const TensorShape& shape() const { return shape_; }
  int64 NumElements() const { return shape_.num_elements(); }
  template <typename T> const T* data() const { return buf_ ? buf_->base<T>() : nullptr; }
  bool has_buffer() const { return buf_ != nullptr; }

 private:
  void set_dtype(DataType t) { shape_.set_data_type(t); }
  TensorShape shape_;
  TensorBuffer* buf_ = nullptr;
};

#include "function.cpp"

}  // namespace tensorflow

// ---- driver -----------------------------------------------------------------------------------

using namespace tensorflow;

static int fails = 0;
#define EXPECT(cond)                                                       \
  do {                                                                     \
    if (!(cond)) {                                                         \
      fprintf(stderr, "FAIL: %s (line %d)\n", #cond, __LINE__);            \
      fails = 1;                                                           \
    }                                                                      \
  } while (0)

static TensorProto make(int dtype, std::vector<int64_t> dims) {
  TensorProto p;
  p.dtype_ = dtype;
  for (int64_t d : dims) p.shape_.dims_.push_back({d});
  return p;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* c = argv[1];
  Allocator alloc;
  {
    Tensor t;
    if (!strcmp(c, "invalid_dtype_empty")) {
      // a SavedModel constant with 0 elements and dtype 1000, which names no DataType
      TensorProto p = make(1000, {0, 3});
      EXPECT(!t.FromProto(&alloc, p));
      EXPECT(t.dtype() == DT_FLOAT && t.NumElements() == 1);
    } else if (!strcmp(c, "float_content")) {
      TensorProto p = make(DT_FLOAT, {2, 3});
      float v[6] = {1.5f, -2, 3, 4, 5.25f, 6};
      p.tensor_content_.assign(reinterpret_cast<const char*>(v), sizeof v);
      EXPECT(t.FromProto(&alloc, p));
      EXPECT(t.dtype() == DT_FLOAT && t.NumElements() == 6 && t.shape().dims() == 2);
      EXPECT(t.data<float>() && !memcmp(t.data<float>(), v, sizeof v));
    } else if (!strcmp(c, "typed_fields_fill")) {
      TensorProto p = make(DT_INT32, {4});
      p.int_val_ = {7, 9};
      EXPECT(t.FromProto(&alloc, p));
      EXPECT(t.dtype() == DT_INT32 && t.NumElements() == 4);
      const int32_t* d = t.data<int32_t>();
      EXPECT(d && d[0] == 7 && d[1] == 9 && d[2] == 9 && d[3] == 9);
      TensorProto q = make(DT_INT64, {3});  // no values: zeros; replaces the first buffer
      EXPECT(t.FromProto(&alloc, q));
      const int64_t* e = t.data<int64_t>();
      EXPECT(t.dtype() == DT_INT64 && e && e[0] == 0 && e[1] == 0 && e[2] == 0);
      EXPECT(alloc.live == 1);
    } else if (!strcmp(c, "empty_tensor")) {
      TensorProto p = make(DT_DOUBLE, {0, 5});
      memory_logging = true;
      EXPECT(t.FromProto(&alloc, p));
      EXPECT(t.dtype() == DT_DOUBLE && t.NumElements() == 0 && !t.has_buffer());
      EXPECT(recorded_allocations == 0);
      TensorProto q = make(DT_BOOL, {2});
      q.bool_val_ = {true, false};
      EXPECT(t.FromProto(&alloc, q));
      EXPECT(t.dtype() == DT_BOOL && t.data<bool>() && t.data<bool>()[0] && !t.data<bool>()[1]);
      EXPECT(recorded_allocations == 1);
    } else if (!strcmp(c, "rejects_bad_protos")) {
      TensorProto good = make(DT_UINT8, {3});
      good.int_val_ = {1, 2, 3};
      EXPECT(t.FromProto(&alloc, good));
      TensorProto neg = make(DT_FLOAT, {2, -1});
      EXPECT(!t.FromProto(&alloc, neg));
      TensorProto invalid = make(DT_INVALID, {2});
      EXPECT(!t.FromProto(&alloc, invalid));
      TensorProto short_content = make(DT_DOUBLE, {2});
      short_content.tensor_content_.assign(8, '\0');
      EXPECT(!t.FromProto(&alloc, short_content));
      TensorProto ref_type = make(DT_FLOAT_REF, {2});
      EXPECT(!t.FromProto(&alloc, ref_type));
      TensorProto unknown_nonempty = make(1000, {2});
      EXPECT(!t.FromProto(&alloc, unknown_nonempty));
      // a failed decode leaves the tensor as it was
      EXPECT(t.dtype() == DT_UINT8 && t.NumElements() == 3 && t.data<uint8_t>()[2] == 3);
    } else if (!strcmp(c, "unknown_dtype_in_byte")) {
      // dtype 150 fits the shape's byte but names no DataType: an empty tensor of it is still refused
      TensorProto p = make(150, {0});
      EXPECT(!t.FromProto(&alloc, p));
      EXPECT(t.dtype() == DT_FLOAT);
    } else {
      return 2;
    }
  }
  EXPECT(alloc.live == 0);
  return fails;
}
