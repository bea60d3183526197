// Harness for tensorflow DependencyOptimizer::SafeToRemoveIdentity
// (tensorflow/core/grappler/optimizers/dependency_optimizer.cc, CVE-2022-23579).
// Stand-ins: NodeDef (name, op, inputs), grappler's NodeMap (GetNode: nullptr for a name not in the graph;
// GetOutputs: the consumers of a node, empty for none), NodeName / AsControlDependency from grappler/utils,
// the op_types.cc predicates by op name, the optimizer's three members the function reads, and CHECK / VLOG
// (CHECK prints and aborts like LOG(FATAL); VLOG(1) is off, as by default).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

namespace tensorflow {

using std::string;

namespace logging_internal {
// a LOG(FATAL)-like message on stderr: the stream prints as it goes and the destructor aborts
class Fatal {
 public:
  Fatal(const char* file, int line, const char* cond) { fprintf(stderr, "F %s:%d] Check failed: %s ", file, line, cond); }
  [[noreturn]] ~Fatal() {
    fputc('\n', stderr);
    abort();
  }
  Fatal& operator<<(const char* v) { fputs(v, stderr); return *this; }
  Fatal& operator<<(const std::string& v) { fputs(v.c_str(), stderr); return *this; }
};
class Null {
 public:
  template <typename T>
  Null& operator<<(const T&) { return *this; }
};
}  // namespace logging_internal

#define CHECK(cond) \
  for (; !(cond);) ::tensorflow::logging_internal::Fatal(__FILE__, __LINE__, #cond)
#define VLOG(level) while (false) ::tensorflow::logging_internal::Null()

class NodeDef {
 public:
  const string& name() const { return name_; }
  const string& op() const { return op_; }
  int input_size() const { return (int)input_.size(); }
  const string& input(int i) const { return input_.at(i); }
  const std::vector<string>& input() const { return input_; }
  string name_, op_;
  std::vector<string> input_;
};

namespace grappler {

// grappler/utils.h
inline string NodeName(const string& name) {  // "^node" and "node:2" -> "node"
  string n = (!name.empty() && name[0] == '^') ? name.substr(1) : name;
  size_t colon = n.rfind(':');
  if (colon != string::npos && colon + 1 < n.size() &&
      n.find_first_not_of("0123456789", colon + 1) == string::npos)
    n.resize(colon);
  return n;
}
inline string AsControlDependency(const string& node_name) {
  return node_name[0] == '^' ? node_name : "^" + node_name;
}

class NodeMap {
 public:
  explicit NodeMap(std::vector<NodeDef>* graph) {
    for (NodeDef& n : *graph) nodes_[n.name()] = &n;
    for (NodeDef& n : *graph)
      for (const string& in : n.input()) outputs_[NodeName(in)].insert(&n);
  }
  NodeDef* GetNode(const string& name) const {
    auto it = nodes_.find(NodeName(name));
    return it == nodes_.end() ? nullptr : it->second;
  }
  const std::set<NodeDef*>& GetOutputs(const string& node_name) const {
    auto it = outputs_.find(node_name);
    return it == outputs_.end() ? empty_set_ : it->second;
  }

 private:
  std::map<string, NodeDef*> nodes_;
  std::map<string, std::set<NodeDef*>> outputs_;
  const std::set<NodeDef*> empty_set_;
};

// grappler/op_types.cc
inline bool IsIdentity(const NodeDef& n) { return n.op() == "Identity" || n.op() == "RefIdentity"; }
inline bool IsIdentityN(const NodeDef& n) { return n.op() == "IdentityN"; }
inline bool IsVariable(const NodeDef& n) {
  const auto& op = n.op();
  return op == "Variable" || op == "VariableV2" || op == "AutoReloadVariable" || op == "VarHandleOp" ||
         op == "ReadVariableOp" || op == "_VarHandlesOp" || op == "_ReadVariablesOp";
}
inline bool IsRecv(const NodeDef& n) { return n.op() == "_Recv" || n.op() == "_HostRecv"; }
inline bool IsRetval(const NodeDef& n) { return n.op() == "_Retval" || n.op() == "_DeviceRetval"; }
inline bool IsMerge(const NodeDef& n) {
  return n.op() == "Merge" || n.op() == "RefMerge" || n.op() == "_XlaMerge";
}
inline bool IsSwitch(const NodeDef& n) {
  return n.op() == "Switch" || n.op() == "RefSwitch" || n.op() == "_SwitchN";
}

class DependencyOptimizer {
 public:
  DependencyOptimizer(std::vector<NodeDef>* graph, std::unordered_set<string> preserve, bool fetch_known)
      : nodes_to_preserve_(std::move(preserve)), fetch_nodes_known_(fetch_known),
        node_map_(new NodeMap(graph)) {}
  bool SafeToRemoveIdentity(const NodeDef& node) const;

 private:
  std::unordered_set<string> nodes_to_preserve_;
  bool fetch_nodes_known_;
  std::unique_ptr<NodeMap> node_map_;
};

#include "function.cpp"

}  // namespace grappler
}  // namespace tensorflow

// ---- driver -----------------------------------------------------------------------------------

using tensorflow::NodeDef;
using tensorflow::grappler::DependencyOptimizer;

static NodeDef node(const char* name, const char* op, std::vector<std::string> inputs = {}) {
  NodeDef n;
  n.name_ = name;
  n.op_ = op;
  n.input_ = std::move(inputs);
  return n;
}

static int expect(const DependencyOptimizer& opt, const NodeDef& n, bool want) {
  bool got = opt.SafeToRemoveIdentity(n);
  if (got != want) {
    fprintf(stderr, "SafeToRemoveIdentity(%s) = %d, want %d\n", n.name().c_str(), got, want);
    return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const char* c = argv[1];
  if (!strcmp(c, "input_not_in_graph")) {
    // an altered SavedModel: the Identity's input names a node the graph does not have
    std::vector<NodeDef> g = {node("id", "Identity", {"missing:0"}), node("out", "Neg", {"id"})};
    DependencyOptimizer opt(&g, {}, true);
    return expect(opt, g[0], false);
  }
  if (!strcmp(c, "plain_identity")) {
    std::vector<NodeDef> g = {node("x", "Const"), node("id", "Identity", {"x:0"}), node("out", "Neg", {"id"}),
                              node("relu", "Relu", {"x"})};
    DependencyOptimizer opt(&g, {}, true);
    return expect(opt, g[1], true) | expect(opt, g[3], true);  // a non-identity node is always safe
  }
  if (!strcmp(c, "preserved_or_unknown_fetch")) {
    std::vector<NodeDef> g = {node("x", "Const"), node("id", "Identity", {"x"}), node("out", "Neg", {"id"})};
    DependencyOptimizer keep(&g, {"id"}, true);
    DependencyOptimizer unknown(&g, {}, false);
    std::vector<NodeDef> h = {node("idn", "IdentityN")};
    DependencyOptimizer no_input(&h, {}, true);
    return expect(keep, g[1], false) | expect(unknown, g[1], false) | expect(no_input, h[0], false);
  }
  if (!strcmp(c, "variable_or_recv_input")) {
    std::vector<NodeDef> g = {node("v", "VariableV2"), node("r", "_Recv"), node("id1", "Identity", {"v"}),
                              node("id2", "Identity", {"r"}), node("a", "Neg", {"id1"}), node("b", "Neg", {"id2"})};
    DependencyOptimizer opt(&g, {}, true);
    return expect(opt, g[2], false) | expect(opt, g[3], false);
  }
  if (!strcmp(c, "identity_n_to_retval")) {
    std::vector<NodeDef> g = {node("x", "Const"), node("y", "Const"), node("idn", "IdentityN", {"x", "y"}),
                              node("ret", "_Retval", {"idn:1"}), node("idn2", "IdentityN", {"x", "y"}),
                              node("neg", "Neg", {"idn2:0"})};
    DependencyOptimizer opt(&g, {}, true);
    return expect(opt, g[2], false) | expect(opt, g[4], true);
  }
  if (!strcmp(c, "switch_control_dependency")) {
    std::vector<NodeDef> g = {node("p", "Placeholder"), node("sw", "Switch", {"p", "p"}),
                              node("id", "Identity", {"sw:1"}), node("c", "Const", {"^id"}),
                              node("id2", "Identity", {"sw:0"}), node("d", "Neg", {"id2"})};
    DependencyOptimizer opt(&g, {}, true);
    return expect(opt, g[2], false) | expect(opt, g[4], true);
  }
  return 2;
}
