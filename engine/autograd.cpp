#include "engine/autograd.h"

#include "engine/backend.h"
#include "engine/ops.h"

#include <unordered_map>
#include <unordered_set>

namespace engine {

namespace {
thread_local bool grad_mode = true;
}

bool grad_mode_enabled() { return grad_mode; }
NoGradGuard::NoGradGuard() : previous_(grad_mode) { grad_mode = false; }
NoGradGuard::~NoGradGuard() { grad_mode = previous_; }

bool should_record(const std::vector<Tensor>& inputs) {
  if (!grad_mode) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

void record(Tensor& output, std::string op, std::vector<Tensor> inputs, Node::BackwardFn backward) {
  if (!should_record(inputs)) return;
  auto node = std::make_shared<Node>();
  node->op = std::move(op);
  node->inputs = std::move(inputs);
  node->backward = std::move(backward);
  output.impl().grad_fn = std::move(node);
  output.impl().requires_grad = true;
}

Tensor Node::take_gradient_so_far(size_t i, DType dtype, bool spaced_rows) const {
  if (!has_gradient_so_far(i)) return Tensor();
  Tensor& so_far = gradient_so_far[i];
  const bool fits = so_far.is_contiguous() || (spaced_rows && view_of(so_far).even_row_stride());
  if (so_far.dtype() != dtype || !fits) return Tensor();
  return std::move(so_far);
}

Tensor edge_only(const Tensor& t) {
  if (!t.defined() || (t.is_leaf() && t.requires_grad())) return t;
  auto impl = std::make_shared<TensorImpl>(t.impl());
  auto storage = std::make_shared<Storage>();  // no data, only where it was
  storage->device = t.device();
  impl->storage = std::move(storage);
  impl->offset = 0;
  return Tensor(std::move(impl));
}

namespace {

// Nodes reachable from `root`, each after every node that consumes its output.
// Shared pointers keep every node alive while backward frees their inputs.
std::vector<std::shared_ptr<Node>> topological_order(const std::shared_ptr<Node>& root) {
  std::vector<std::shared_ptr<Node>> order;
  std::unordered_set<Node*> visited;
  // Iterative DFS: deep graphs (many layers, many ops) must not overflow the stack.
  std::vector<std::pair<std::shared_ptr<Node>, size_t>> stack{{root, 0}};
  visited.insert(root.get());
  while (!stack.empty()) {
    auto& [node, next] = stack.back();
    if (next < node->inputs.size()) {
      const Tensor& input = node->inputs[next++];
      std::shared_ptr<Node> parent = input.defined() ? input.impl().grad_fn : nullptr;
      if (parent && visited.insert(parent.get()).second) stack.push_back({parent, 0});
    } else {
      order.push_back(node);
      stack.pop_back();
    }
  }
  return {order.rbegin(), order.rend()};  // root first
}

// Sums a tensor's gradients from its several uses (bf16 ones in f32, rounded once).
void accumulate(Tensor& slot, const Tensor& grad) { slot = slot.defined() ? add(slot, grad) : grad; }

}  // namespace

void run_backward(const Tensor& root, const Tensor& seed, bool retain_graph) {
  check(root.requires_grad(), "backward() on a tensor that does not require grad");
  Tensor grad = seed;
  if (!grad.defined()) {
    check(root.numel() == 1, "backward() without a gradient needs a scalar, got shape {}", shape_str(root.shape()));
    grad = Tensor::ones(root.shape(), root.dtype(), root.device());
  }
  check(grad.shape() == root.shape(), "backward(): gradient shape {} does not match tensor shape {}",
        shape_str(grad.shape()), shape_str(root.shape()));

  NoGradGuard no_grad;  // gradients of gradients are not supported
  if (root.is_leaf()) {
    Tensor slot = root.grad();
    accumulate(slot, grad);
    root.set_grad(slot);
    return;
  }

  std::unordered_map<Node*, Tensor> grads;  // gradient of each node's output
  grads[root.impl().grad_fn.get()] = grad;
  for (const std::shared_ptr<Node>& node : topological_order(root.impl().grad_fn)) {
    auto it = grads.find(node.get());
    if (it == grads.end()) continue;  // no gradient reached this node
    Tensor grad_output = std::move(it->second);
    grads.erase(it);
    check(static_cast<bool>(node->backward), "backward through '{}' a second time: pass retain_graph=true", node->op);
    // Hand over what each input's producer has summed so far (once per producer, to the first
    // input it made); what the backward does not take is summed first, as it would have been.
    node->gradient_so_far.assign(node->inputs.size(), Tensor());
    for (size_t i = 0; i < node->inputs.size(); ++i) {
      Node* parent = node->needs_grad(i) ? node->inputs[i].impl().grad_fn.get() : nullptr;
      auto so_far = parent ? grads.find(parent) : grads.end();
      if (so_far == grads.end()) continue;
      node->gradient_so_far[i] = std::move(so_far->second);
      grads.erase(so_far);
    }
    std::vector<Tensor> input_grads = node->backward(grad_output, *node);
    check(input_grads.size() == node->inputs.size(), "backward of '{}' returned {} gradients for {} inputs", node->op,
          input_grads.size(), node->inputs.size());
    for (size_t i = 0; i < input_grads.size(); ++i) {
      const Tensor& input = node->inputs[i];
      if (Tensor& untaken = node->gradient_so_far[i]; untaken.defined())
        grads[input.impl().grad_fn.get()] = std::move(untaken);
      if (!node->needs_grad(i) || !input_grads[i].defined()) continue;
      check(input_grads[i].shape() == input.shape(), "backward of '{}': gradient {} for input {} of shape {}", node->op,
            shape_str(input_grads[i].shape()), i, shape_str(input.shape()));
      if (Node* parent = input.impl().grad_fn.get()) {
        accumulate(grads[parent], input_grads[i]);
      } else {
        Tensor slot = input.grad();
        accumulate(slot, input_grads[i]);
        input.set_grad(slot);
      }
    }
    node->gradient_so_far.clear();
    if (!retain_graph) {  // free saved tensors as soon as they are used
      node->backward = nullptr;
      node->inputs.clear();
    }
  }
}

}  // namespace engine
