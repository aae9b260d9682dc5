// The CUDA backend: engine::Backend on NVIDIA GPUs. Compiled only when the
// 'cuda' option finds nvcc; until the CUDA work lands it reports no devices.
#pragma once

#include "engine/backend.h"

namespace engine {

int cuda_device_count();
// Throws engine::Error when the device does not exist.
Backend& cuda_backend(int index);

}  // namespace engine
