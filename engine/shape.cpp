#include "engine/shape.h"

#include "engine/device.h"
#include "engine/error.h"

#include <algorithm>
#include <ostream>

namespace engine {

int64_t numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

ShapeStr::operator std::string() const { return fmt::format("[{}]", fmt::join(shape, ", ")); }

std::ostream& operator<<(std::ostream& out, const ShapeStr& s) { return out << std::string(s); }

int64_t wrap_dim(int64_t dim, int64_t rank, const char* what) {
  check(dim >= -rank && dim < std::max<int64_t>(rank, 1), "{}: dim {} out of range for a tensor of rank {}", what, dim,
        rank);
  return dim < 0 ? dim + rank : dim;
}

Shape broadcast_shapes(const Shape& a, const Shape& b) {
  size_t rank = std::max(a.size(), b.size());
  Shape out(rank);
  for (size_t i = 0; i < rank; ++i) {
    int64_t da = i < rank - a.size() ? 1 : a[i - (rank - a.size())];
    int64_t db = i < rank - b.size() ? 1 : b[i - (rank - b.size())];
    check(da == db || da == 1 || db == 1, "cannot broadcast shapes {} and {}", shape_str(a), shape_str(b));
    out[i] = da == 1 ? db : da;
  }
  return out;
}

Device Device::parse(const std::string& text) {
  if (text == "cpu") return cpu();
  if (text == "cuda") return cuda(0);
  if (text.rfind("cuda:", 0) == 0 && text.size() > 5 &&
      std::all_of(text.begin() + 5, text.end(), [](char c) { return c >= '0' && c <= '9'; }) && text.size() < 9)
    return cuda(std::stoi(text.substr(5)));
  fail("unknown device '{}': expected cpu, cuda or cuda:N", text);
}

}  // namespace engine
