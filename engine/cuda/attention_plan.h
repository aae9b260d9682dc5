// How one backend attention call maps onto the kernels of engine/cuda/kernels.h:
// whether the tensor-core family takes its operands as they are (any strides,
// bf16 inputs), and the kernels' AttentionShape with every operand's strides.
// Host code (g++), for CudaBackend's attention_forward and attention_backward.
#pragma once

#include "engine/backend.h"
#include "engine/cuda/kernels.h"

namespace engine::cuda {

inline const View kNoView{};

// One call's operands, by reference: no shapes copied per call. Those with
// data == nullptr (the forward's kNoView, a gradient not wanted) play no part.
struct AttentionViews {
  const View &q, &k, &v, &out;
  const View &dout = kNoView, &dq = kNoView, &dk = kNoView, &dv = kNoView;
};

// The tensor-core kernels take bf16 inputs with D <= 128, an output and
// gradients in f32 or bf16 (the three gradients in one dtype), through any
// strides whose D is contiguous.
bool tensor_core_fits(const AttentionViews& views);

// The geometry, masking, dropout and every operand's strides.
AttentionShape attention_shape(const AttentionViews& views, const View& key_mask, const AttentionArgs& args);

// Multiply-adds of the products, halved under causal masking, times per_product.
double attention_flops(const AttentionShape& shape, double per_product);

// f32 or f64 inputs with an output of their dtype, or bf16 inputs with an f32 or bf16 output.
void check_attention_dtypes(const View& q, const View& out, const char* op);

}  // namespace engine::cuda
