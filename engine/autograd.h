// Reverse-mode autodiff, eager and define-by-run. Each op that sees an input
// requiring grad records a Node: its inputs and a backward function that maps
// the output's gradient to the inputs' gradients. Tensor::backward() runs the
// nodes in reverse topological order and accumulates into leaves' .grad().
#pragma once

#include "engine/tensor.h"

#include <functional>
#include <string>
#include <vector>

namespace engine {

struct Node {
  // Returns one gradient per input; an undefined Tensor where an input needs none.
  // Backward functions must skip work for inputs with !needs_grad(i): that is
  // what spares frozen weights their weight-gradient GEMMs.
  using BackwardFn = std::function<std::vector<Tensor>(const Tensor& grad_output, const Node& node)>;

  std::string op;              // for error messages and debugging
  std::vector<Tensor> inputs;  // edges to the parents
  BackwardFn backward;

  bool needs_grad(size_t i) const { return inputs[i].defined() && inputs[i].requires_grad(); }

  // While the backward runs: the gradient that input i has received so far
  // from the nodes run before this one, if it is of `dtype` and contiguous
  // (or, with spaced_rows, has evenly spaced rows: View::even_row_stride), and
  // undefined otherwise. A backward that takes it must return input i's
  // gradient with it added: so the sum of a residual stream's gradients
  // rides in a kernel the backward runs anyway (layer norm's, a GEMM's
  // addend) instead of a separate add, which reads and writes it all again.
  Tensor take_gradient_so_far(size_t i, DType dtype, bool spaced_rows = false) const;
  bool has_gradient_so_far(size_t i) const { return i < gradient_so_far.size() && gradient_so_far[i].defined(); }

  // Filled by run_backward for the backward's duration (mutable: the backward gets a const Node).
  mutable std::vector<Tensor> gradient_so_far;
};

// True when an op on these inputs must record a node (grad mode on and some
// input requires grad).
bool should_record(const std::vector<Tensor>& inputs);

// Attaches a node to `output` (which must be freshly made by the op) and marks
// it as requiring grad. Tensors the backward needs are captured by the lambda;
// capture the op's own output only through output.detach(), to avoid a cycle.
// Does nothing when should_record(inputs) is false.
void record(Tensor& output, std::string op, std::vector<Tensor> inputs, Node::BackwardFn backward);

// The graph edge to `t` without its data, for an input whose data the op's
// backward never reads (the operands of an add, a dropout's input, the
// activation multiplied by a frozen weight): the node keeps t's producer
// reachable, and t's shape, dtype and device, but not its memory, which is
// then freed as soon as the forward is done with it, as PyTorch frees what it
// does not save. A leaf that requires grad is returned as it is, since its
// .grad() is accumulated in it. Reading the data of the edge is an error.
Tensor edge_only(const Tensor& t);

// Runs backward from `root` seeded with `grad` (see Tensor::backward).
void run_backward(const Tensor& root, const Tensor& grad, bool retain_graph);

}  // namespace engine
