// engine::Error: the one exception type the library throws. Its message is a
// single line that says what was expected and what was found, so the CLI can
// print it as-is and exit non-zero.
#pragma once

#include "engine/shape.h"

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace engine {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Throws engine::Error with a formatted message unless `condition` holds.
template <typename... Args>
inline void check(bool condition, fmt::format_string<Args...> format, Args&&... args) {
  if (!condition) throw Error(fmt::format(format, std::forward<Args>(args)...));
}

template <typename... Args>
[[noreturn]] inline void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace engine

// Shapes in messages (engine::shape_str), formatted only when a message is built.
template <>
struct fmt::formatter<engine::ShapeStr> : fmt::formatter<std::string_view> {
  template <typename FormatContext>
  auto format(const engine::ShapeStr& s, FormatContext& ctx) const {
    return fmt::formatter<std::string_view>::format(std::string(s), ctx);
  }
};
