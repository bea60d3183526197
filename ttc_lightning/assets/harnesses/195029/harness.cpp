// Harness for tensorflow Node::RunForwardTypeInference (tensorflow/core/graph/graph.cc, CVE-2022-23592).
// Stand-ins: FullTypeDef with its repeated args field as a protobuf RepeatedPtrField (a heap array of element
// pointers grown like protobuf's: capacity at least 4, doubling; Get(i) reads elements[i] unchecked, its
// GOOGLE_DCHECKs being off in release builds); NodeDef with an optional experimental_type; Node keeping
// TensorFlow's shared NodeProperties (copy on write), in-edges, ClearTypeInfo and MaybeCopyOnWrite; Edge;
// StatusOr; and the logging macros of a release build (DCHECK off, VLOG(4) off, LOG(WARNING) to stderr).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace tensorflow {

using std::string;

// release-build logging: DCHECK and VLOG(4) compile their message but never run it; LOG(WARNING) prints
struct LogStream {
  LogStream& operator<<(const char* v) { fputs(v, stderr); return *this; }
  LogStream& operator<<(const std::string& v) { fputs(v.c_str(), stderr); return *this; }
  LogStream& operator<<(long long v) { fprintf(stderr, "%lld", v); return *this; }
  ~LogStream() { fputc('\n', stderr); }
};
#define DCHECK(condition) while (false && (condition)) LogStream()
#define VLOG(level) while (false) LogStream()
#define LOG(severity) LogStream() << #severity ": "

// google/protobuf/repeated_field.h, reduced
template <typename T>
class RepeatedPtrField {
  struct Rep {
    int allocated_size;
    void* elements[1];
  };

 public:
  RepeatedPtrField() = default;
  RepeatedPtrField(const RepeatedPtrField& o) { *this = o; }
  RepeatedPtrField& operator=(const RepeatedPtrField& o) {
    if (this == &o) return *this;
    Clear();
    for (int i = 0; i < o.size(); ++i) *Add() = o.Get(i);
    return *this;
  }
  ~RepeatedPtrField() { Destroy(); }
  int size() const { return current_size_; }
  const T& Get(int index) const { return *static_cast<const T*>(rep_->elements[index]); }
  T* Add() {
    if (rep_ == nullptr || current_size_ == total_size_) Reserve(total_size_ + 1);
    T* t = new T();
    rep_->elements[current_size_++] = t;
    rep_->allocated_size = current_size_;
    return t;
  }
  void Clear() {
    Destroy();
    rep_ = nullptr;
    current_size_ = total_size_ = 0;
  }

 private:
  void Reserve(int new_size) {
    new_size = std::max(4, std::max(total_size_ * 2, new_size));
    Rep* r = static_cast<Rep*>(::operator new(offsetof(Rep, elements) + sizeof(void*) * new_size));
    r->allocated_size = current_size_;
    if (rep_) {
      memcpy(r->elements, rep_->elements, sizeof(void*) * current_size_);
      ::operator delete(rep_);
    }
    rep_ = r;
    total_size_ = new_size;
  }
  void Destroy() {
    if (!rep_) return;
    for (int i = 0; i < rep_->allocated_size; ++i) delete static_cast<T*>(rep_->elements[i]);
    ::operator delete(rep_);
  }
  Rep* rep_ = nullptr;
  int current_size_ = 0;
  int total_size_ = 0;
};

// core/framework/full_type.proto
enum FullTypeId { TFT_UNSET = 0, TFT_TENSOR = 1000, TFT_PRODUCT = 3, TFT_FLOAT = 201, TFT_INT32 = 204 };

class FullTypeDef {
 public:
  FullTypeId type_id() const { return type_id_; }
  void set_type_id(FullTypeId t) { type_id_ = t; }
  int args_size() const { return args_.size(); }
  const FullTypeDef& args(int i) const { return args_.Get(i); }
  FullTypeDef* add_args() { return args_.Add(); }
  string DebugString() const {
    string s = "type_id: " + std::to_string(type_id_);
    for (int i = 0; i < args_size(); ++i) s += " args { " + args(i).DebugString() + " }";
    return s;
  }

 private:
  FullTypeId type_id_ = TFT_UNSET;
  RepeatedPtrField<FullTypeDef> args_;
};

class NodeDef {
 public:
  const string& name() const { return name_; }
  bool has_experimental_type() const { return type_ != nullptr; }
  const FullTypeDef& experimental_type() const {
    static const FullTypeDef default_instance;
    return type_ ? *type_ : default_instance;
  }
  FullTypeDef* mutable_experimental_type() {
    if (!type_) type_.reset(new FullTypeDef());
    return type_.get();
  }
  void clear_experimental_type() { type_.reset(); }
  string DebugString() const { return "name: \"" + name_ + "\""; }

  NodeDef() = default;
  NodeDef(const NodeDef& o) : name_(o.name_), type_(o.type_ ? new FullTypeDef(*o.type_) : nullptr) {}
  string name_;

 private:
  std::unique_ptr<FullTypeDef> type_;
};

template <typename T>
class StatusOr {
 public:
  StatusOr(const T& v) : v_(v) {}  // NOLINT: implicit, as in TensorFlow
  const T& ValueOrDie() const { return v_; }

 private:
  T v_;
};

typedef std::vector<std::reference_wrapper<const FullTypeDef>> TypeRefVector;
typedef std::function<StatusOr<FullTypeDef>(const TypeRefVector&)> ForwardTypeInferenceFn;
typedef std::vector<int> DataTypeVector;

struct NodeProperties {
  NodeDef node_def;
  DataTypeVector input_types;
  ForwardTypeInferenceFn fwd_type_fn;
};

class Node;

class Edge {
 public:
  Edge(Node* src, int src_output, Node* dst, int dst_input)
      : src_(src), dst_(dst), src_output_(src_output), dst_input_(dst_input) {}
  Node* src() const { return src_; }
  Node* dst() const { return dst_; }
  int src_output() const { return src_output_; }
  int dst_input() const { return dst_input_; }
  bool IsControlEdge() const { return src_output_ == -1; }  // Graph::kControlSlot

 private:
  Node* src_;
  Node* dst_;
  int src_output_;
  int dst_input_;
};

class Node {
 public:
  explicit Node(std::shared_ptr<NodeProperties> props) : props_(std::move(props)) {}
  const string& name() const { return props_->node_def.name(); }
  const NodeDef& def() const { return props_->node_def; }
  string DebugString() const { return "{name:'" + name() + "'}"; }
  void RunForwardTypeInference();

  std::vector<const Edge*> in_edges_;
  std::shared_ptr<NodeProperties> props_;

 private:
  void MaybeCopyOnWrite() {
    if (props_.use_count() != 1) props_ = std::make_shared<NodeProperties>(*props_);
  }
  void ClearTypeInfo() {
    if (props_->node_def.has_experimental_type()) {
      MaybeCopyOnWrite();
      props_->node_def.clear_experimental_type();
    }
  }
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

static FullTypeDef tensor_of(FullTypeId t) {
  FullTypeDef d;
  d.set_type_id(TFT_TENSOR);
  d.add_args()->set_type_id(t);
  return d;
}

// a node with `n_inputs` input slots, its experimental type a PRODUCT of `outputs` (none: no type)
static std::unique_ptr<Node> make_node(const char* name, int n_inputs, std::vector<FullTypeDef> outputs,
                                       bool typed = true, ForwardTypeInferenceFn fn = nullptr) {
  auto props = std::make_shared<NodeProperties>();
  props->node_def.name_ = name;
  props->input_types.assign(n_inputs, 1);
  props->fwd_type_fn = std::move(fn);
  if (typed) {
    FullTypeDef* t = props->node_def.mutable_experimental_type();
    t->set_type_id(TFT_PRODUCT);
    for (auto& o : outputs) *t->add_args() = o;
  }
  return std::unique_ptr<Node>(new Node(props));
}

// the forward function of a two-input op: the product of its input types
static StatusOr<FullTypeDef> product_of_inputs(const TypeRefVector& in) {
  FullTypeDef t;
  t.set_type_id(TFT_PRODUCT);
  for (const FullTypeDef& i : in) *t.add_args() = i;
  return t;
}
static StatusOr<FullTypeDef> unset(const TypeRefVector&) { return FullTypeDef(); }

static bool is_tensor_of(const FullTypeDef& t, FullTypeId e) {
  return t.type_id() == TFT_TENSOR && t.args_size() == 1 && t.args(0).type_id() == e;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* c = argv[1];
  // a: outputs (float tensor, int32 tensor); b: a node whose type is set but TFT_UNSET
  auto a = make_node("a", 0, {tensor_of(TFT_FLOAT), tensor_of(TFT_INT32)});
  auto b = make_node("b", 0, {}, true);
  b->props_->node_def.mutable_experimental_type()->set_type_id(TFT_UNSET);
  auto n = make_node("n", 2, {tensor_of(TFT_FLOAT)}, true, product_of_inputs);
  std::vector<std::unique_ptr<Edge>> edges;
  auto connect = [&](Node* src, int out, Node* dst, int in) {
    edges.emplace_back(new Edge(src, out, dst, in));
    dst->in_edges_.push_back(edges.back().get());
  };

  if (!strcmp(c, "output_index_past_args")) {
    // a corrupted graph: the edge leaves a's output 4, but a's type lists only 2 outputs
    connect(a.get(), 4, n.get(), 0);
    connect(a.get(), 0, n.get(), 1);
    n->RunForwardTypeInference();
    EXPECT(!n->def().has_experimental_type());
  } else if (!strcmp(c, "infers_from_inputs")) {
    connect(a.get(), 1, n.get(), 0);
    connect(b.get(), 0, n.get(), 1);
    n->RunForwardTypeInference();
    const FullTypeDef& t = n->def().experimental_type();
    EXPECT(t.type_id() == TFT_PRODUCT && t.args_size() == 2);
    EXPECT(t.args_size() == 2 && is_tensor_of(t.args(0), TFT_INT32));
    EXPECT(t.args_size() == 2 && t.args(1).type_id() == TFT_UNSET && t.args(1).args_size() == 0);
  } else if (!strcmp(c, "control_edges_ignored")) {
    auto ctl = make_node("ctl", 0, {});
    connect(ctl.get(), -1, n.get(), -1);
    connect(a.get(), 0, n.get(), 1);
    connect(a.get(), 1, n.get(), 0);
    n->RunForwardTypeInference();
    const FullTypeDef& t = n->def().experimental_type();
    EXPECT(t.args_size() == 2 && is_tensor_of(t.args(0), TFT_INT32) && is_tensor_of(t.args(1), TFT_FLOAT));
  } else if (!strcmp(c, "incomplete_inputs")) {
    auto untyped = make_node("u", 0, {}, false);
    connect(a.get(), 0, n.get(), 0);  // input 1 has no edge yet
    n->RunForwardTypeInference();
    EXPECT(!n->def().has_experimental_type());
    auto m = make_node("m", 2, {tensor_of(TFT_FLOAT)}, true, product_of_inputs);
    connect(a.get(), 0, m.get(), 0);
    connect(untyped.get(), 0, m.get(), 1);  // an input without type information
    m->RunForwardTypeInference();
    EXPECT(!m->def().has_experimental_type());
  } else if (!strcmp(c, "copy_on_write")) {
    // a copied node shares its properties: inference must not change the original's
    Node copy(n->props_);
    connect(a.get(), 0, &copy, 0);
    connect(a.get(), 1, &copy, 1);
    copy.RunForwardTypeInference();
    EXPECT(copy.def().experimental_type().args_size() == 2);
    EXPECT(n->def().experimental_type().args_size() == 1);
    EXPECT(copy.props_ != n->props_);
  } else if (!strcmp(c, "no_function_or_unset_result")) {
    auto plain = make_node("p", 1, {tensor_of(TFT_FLOAT)});  // no forward function
    connect(a.get(), 1, plain.get(), 0);
    plain->RunForwardTypeInference();
    EXPECT(plain->def().experimental_type().args_size() == 1);
    auto u = make_node("q", 1, {tensor_of(TFT_FLOAT)}, true, unset);
    connect(a.get(), 1, u.get(), 0);
    u->RunForwardTypeInference();  // an unset result leaves the type as it was
    EXPECT(u->def().experimental_type().args_size() == 1 &&
           is_tensor_of(u->def().experimental_type().args(0), TFT_FLOAT));
    connect(a.get(), 1, n.get(), 0);
    connect(a.get(), 0, n.get(), 1);
    n->RunForwardTypeInference();
    EXPECT(n->def().experimental_type().args_size() == 2);
  } else {
    return 2;
  }
  return fails;
}
