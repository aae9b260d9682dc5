// libFuzzer harness for the safetensors reader: any input must either parse,
// with every tensor readable, or throw engine::Error. Build and run: README.md.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "engine/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto bytes = std::make_shared<std::vector<std::byte>>(size);
  for (size_t i = 0; i < size; ++i) (*bytes)[i] = std::byte(data[i]);
  try {
    engine::io::SafetensorsFile file = engine::io::SafetensorsFile::parse(bytes, "fuzz");
    for (const std::string& key : file.keys()) {
      const engine::io::SafetensorsEntry& entry = file.entry(key);
      if (!entry.dtype) continue;  // unsupported dtypes only fail when requested
      engine::Tensor view = file.tensor(key);
      // Read every byte here, in instrumented code, so ASan sees any overrun.
      const auto* p = static_cast<const volatile uint8_t*>(view.data_ptr());
      uint8_t sum = 0;
      for (size_t i = 0; i < entry.end - entry.begin; ++i) sum = uint8_t(sum + p[i]);
      (void)sum;
      (void)file.load(key, engine::DType::F32);
    }
  } catch (const engine::Error&) {
    // Rejecting malformed input is the expected outcome; anything else escapes and aborts.
  }
  return 0;
}
