// Iteration over N operands that share a shape but not strides (views,
// broadcasts with stride 0). Dims that every operand walks contiguously are
// merged first, so the usual case is one long inner loop the compiler can
// vectorise; the runs are then spread over threads.
#pragma once

#include "engine/cpu/parallel.h"
#include "engine/shape.h"

#include <algorithm>
#include <array>

namespace engine::cpu {

template <size_t N>
struct StridedLayout {
  Shape shape;
  std::array<Shape, N> strides;
};

template <size_t N>
StridedLayout<N> coalesce(const Shape& shape, const std::array<const Shape*, N>& strides) {
  StridedLayout<N> out;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;  // size-1 dims carry no stride information
    bool mergeable = !out.shape.empty();
    for (size_t i = 0; i < N && mergeable; ++i)
      mergeable = out.strides[i].back() == (*strides[i])[d] * shape[d];
    if (mergeable) {
      out.shape.back() *= shape[d];
      for (size_t i = 0; i < N; ++i) out.strides[i].back() = (*strides[i])[d];
    } else {
      out.shape.push_back(shape[d]);
      for (size_t i = 0; i < N; ++i) out.strides[i].push_back((*strides[i])[d]);
    }
  }
  return out;
}

// Calls run(offsets, count, inner_strides) over runs of the innermost dim that
// together cover every element once; offsets are in elements per operand.
template <size_t N, typename Run>
void for_each_run(const Shape& shape, const std::array<const Shape*, N>& strides, Run&& run) {
  if (numel(shape) == 0) return;
  StridedLayout<N> layout = coalesce(shape, strides);
  std::array<int64_t, N> zero{};
  if (layout.shape.empty()) {  // a single element
    run(zero, int64_t(1), zero);
    return;
  }
  const size_t rank = layout.shape.size();
  const int64_t inner = layout.shape.back();
  const int64_t rows = numel(layout.shape) / inner;
  std::array<int64_t, N> inner_strides;
  for (size_t i = 0; i < N; ++i) inner_strides[i] = layout.strides[i].back();
  // Split long rows into chunks so a single big 1-D op still uses every thread.
  const int64_t chunk = rows >= 64 ? inner : std::max<int64_t>(4096, (inner + 63) / 64);
  const int64_t chunks_per_row = (inner + chunk - 1) / chunk;
  parallel_for(rows * chunks_per_row, chunk, [&](int64_t task) {
    int64_t row = task / chunks_per_row, part = task % chunks_per_row;
    std::array<int64_t, N> offsets{};
    for (size_t d = rank - 1; d-- > 0;) {  // unravel the row index over the outer dims
      int64_t index = row % layout.shape[d];
      row /= layout.shape[d];
      for (size_t i = 0; i < N; ++i) offsets[i] += index * layout.strides[i][d];
    }
    int64_t begin = part * chunk;
    for (size_t i = 0; i < N; ++i) offsets[i] += begin * inner_strides[i];
    run(offsets, std::min(chunk, inner - begin), inner_strides);
  });
}

}  // namespace engine::cpu
