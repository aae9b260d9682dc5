// Shapes and strides (in elements, row-major), and the NumPy broadcasting rule.
// Negative dims count from the end, as in PyTorch.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

namespace engine {

using Shape = std::vector<int64_t>;

int64_t numel(const Shape& shape);
Shape contiguous_strides(const Shape& shape);

// A shape as messages show it, "[2, 3]". It is formatted only when a message is
// built, so check(ok, "... {}", shape_str(s)) costs nothing while ok holds: hot
// paths check shapes on every op. It refers to `shape`, so use it within the
// expression that makes it (or convert it to std::string). Its fmt formatter is
// in engine/error.h, which CUDA sources (whose compiler rejects fmt) never include.
struct ShapeStr {
  const Shape& shape;
  operator std::string() const;
};
inline ShapeStr shape_str(const Shape& shape) { return {shape}; }
std::ostream& operator<<(std::ostream& out, const ShapeStr& s);

// Maps dim in [-rank, rank) to [0, rank); throws engine::Error naming `what` otherwise.
int64_t wrap_dim(int64_t dim, int64_t rank, const char* what);

// The shape both operands broadcast to; throws engine::Error if incompatible.
Shape broadcast_shapes(const Shape& a, const Shape& b);

}  // namespace engine
