// Shapes and strides (in elements, row-major), and the NumPy broadcasting rule.
// Negative dims count from the end, as in PyTorch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace engine {

using Shape = std::vector<int64_t>;

int64_t numel(const Shape& shape);
Shape contiguous_strides(const Shape& shape);
std::string shape_str(const Shape& shape);  // "[2, 3]"

// Maps dim in [-rank, rank) to [0, rank); throws engine::Error naming `what` otherwise.
int64_t wrap_dim(int64_t dim, int64_t rank, const char* what);

// The shape both operands broadcast to; throws engine::Error if incompatible.
Shape broadcast_shapes(const Shape& a, const Shape& b);

}  // namespace engine
