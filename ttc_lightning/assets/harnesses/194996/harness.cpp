// Harness for tensorflow GetInitOp (tensorflow/cc/saved_model/loader_util.cc, CVE-2022-23577).
// Stand-ins: the MetaGraphDef / SignatureDef / TensorInfo / CollectionDef protos as plain classes with the
// accessors the function uses, their map fields as a google::protobuf::Map whose iterators are, as in protobuf's
// InnerMap, a pointer to a node (nullptr for end()) dereferenced through node_->kv; Status, errors:: and
// strings::StrCat; the SavedModel constants with their values from constants.h.
#include <cstdio>
#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace google {
namespace protobuf {

// map.h: a hash map of nodes; end() is an iterator without a node, and dereferencing it reads through nullptr.
template <typename Key, typename T>
class Map {
 public:
  struct value_type {
    const Key first;
    T second;
  };

 private:
  struct KeyValuePair {
    const Key& key() const { return v->first; }
    value_type* value() const { return v; }
    value_type* v;
  };
  struct Node {
    KeyValuePair kv;
  };

 public:
  class const_iterator {
   public:
    const_iterator() : node_(nullptr) {}
    explicit const_iterator(Node* n) : node_(n) {}
    const value_type& operator*() const { return *node_->kv.value(); }
    const value_type* operator->() const { return &(operator*()); }
    bool operator==(const const_iterator& o) const { return node_ == o.node_; }
    bool operator!=(const const_iterator& o) const { return node_ != o.node_; }

   private:
    Node* node_;
  };

  Map() = default;
  Map(const Map&) = delete;
  ~Map() {
    for (Node* n : nodes_) {
      delete n->kv.v;
      delete n;
    }
  }
  T& operator[](const Key& k) {
    for (Node* n : nodes_)
      if (n->kv.key() == k) return n->kv.v->second;
    Node* n = new Node{{new value_type{k, T()}}};
    nodes_.push_back(n);
    return n->kv.v->second;
  }
  const_iterator find(const Key& k) const {
    for (Node* n : nodes_)
      if (n->kv.key() == k) return const_iterator(n);
    return end();
  }
  const_iterator end() const { return const_iterator(); }
  int size() const { return (int)nodes_.size(); }

 private:
  std::vector<Node*> nodes_;
};

}  // namespace protobuf
}  // namespace google

namespace tensorflow {

using std::string;

namespace error {
enum Code { OK = 0, FAILED_PRECONDITION = 9 };
}

class Status {
 public:
  Status() = default;
  Status(error::Code code, std::string msg) : code_(code), msg_(std::move(msg)) {}
  static Status OK() { return Status(); }
  bool ok() const { return code_ == error::OK; }
  error::Code code() const { return code_; }
  const std::string& error_message() const { return msg_; }

 private:
  error::Code code_ = error::OK;
  std::string msg_;
};

namespace strings {
template <typename... Args>
std::string StrCat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}
}  // namespace strings

namespace errors {
template <typename... Args>
Status FailedPrecondition(const Args&... args) {
  return Status(error::FAILED_PRECONDITION, strings::StrCat(args...));
}
}  // namespace errors

// cc/saved_model/constants.h
constexpr char kSavedModelInitOpSignatureKey[] = "__saved_model_init_op";
constexpr char kSavedModelMainOpKey[] = "saved_model_main_op";
constexpr char kSavedModelLegacyInitOpKey[] = "legacy_init_op";

// core/protobuf/meta_graph.proto
class TensorInfo {
 public:
  const std::string& name() const { return name_; }
  std::string name_;
};

class SignatureDef {
 public:
  const google::protobuf::Map<std::string, TensorInfo>& outputs() const { return outputs_; }
  google::protobuf::Map<std::string, TensorInfo> outputs_;
};

class CollectionDef {
 public:
  class NodeList {
   public:
    int value_size() const { return (int)value_.size(); }
    const std::string& value(int i) const { return value_.at(i); }
    std::vector<std::string> value_;
  };
  const NodeList& node_list() const { return node_list_; }
  NodeList node_list_;
};

class MetaGraphDef {
 public:
  const google::protobuf::Map<std::string, SignatureDef>& signature_def() const { return signature_def_; }
  const google::protobuf::Map<std::string, CollectionDef>& collection_def() const { return collection_def_; }
  google::protobuf::Map<std::string, SignatureDef> signature_def_;
  google::protobuf::Map<std::string, CollectionDef> collection_def_;
};

namespace internal {
#include "function.cpp"
}  // namespace internal

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

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* c = argv[1];
  MetaGraphDef mg;
  std::string name = "unchanged";
  Status s;
  if (!strcmp(c, "signature_without_output")) {
    // a SavedModel whose __saved_model_init_op signature has outputs, none of them under that key
    mg.signature_def_[kSavedModelInitOpSignatureKey].outputs_["other_output"].name_ = "x:0";
    s = internal::GetInitOp("/models/m", mg, &name);
    EXPECT(s.code() == error::FAILED_PRECONDITION);
    EXPECT(name == "unchanged");
  } else if (!strcmp(c, "from_signature")) {
    mg.signature_def_["serving_default"].outputs_[kSavedModelInitOpSignatureKey].name_ = "wrong:0";
    mg.signature_def_[kSavedModelInitOpSignatureKey].outputs_["extra"].name_ = "extra:0";
    mg.signature_def_[kSavedModelInitOpSignatureKey].outputs_[kSavedModelInitOpSignatureKey].name_ = "init_all:0";
    mg.collection_def_[kSavedModelMainOpKey].node_list_.value_ = {"main_op"};
    s = internal::GetInitOp("/models/m", mg, &name);
    EXPECT(s.ok());
    EXPECT(name == "init_all:0");
  } else if (!strcmp(c, "main_op_collection")) {
    mg.collection_def_[kSavedModelMainOpKey].node_list_.value_ = {"main_op"};
    mg.collection_def_[kSavedModelLegacyInitOpKey].node_list_.value_ = {"legacy"};
    s = internal::GetInitOp("/models/m", mg, &name);
    EXPECT(s.ok());
    EXPECT(name == "main_op");
  } else if (!strcmp(c, "legacy_collection")) {
    mg.signature_def_["serving_default"].outputs_["y"].name_ = "y:0";
    mg.collection_def_[kSavedModelLegacyInitOpKey].node_list_.value_ = {"legacy_init"};
    s = internal::GetInitOp("/models/m", mg, &name);
    EXPECT(s.ok());
    EXPECT(name == "legacy_init");
  } else if (!strcmp(c, "two_main_ops")) {
    mg.collection_def_[kSavedModelMainOpKey].node_list_.value_ = {"a", "b"};
    s = internal::GetInitOp("/models/m", mg, &name);
    EXPECT(s.code() == error::FAILED_PRECONDITION);
    EXPECT(s.error_message().find("/models/m") != std::string::npos);
    EXPECT(name == "unchanged");
  } else if (!strcmp(c, "no_init_op")) {
    name.clear();
    mg.signature_def_["serving_default"].outputs_["y"].name_ = "y:0";
    mg.collection_def_["variables"].node_list_.value_ = {"v"};
    s = internal::GetInitOp("/models/m", mg, &name);
    EXPECT(s.ok());
    EXPECT(name.empty());
  } else {
    return 2;
  }
  return fails;
}
