// Where tests find ../shared/data (CURLORA_DATA_DIR, else the folder beside
// the source tree) and their committed goldens (tests/goldens).
#pragma once

#include <cstdlib>
#include <string>

inline std::string test_data_dir() {
  const char* env = std::getenv("CURLORA_DATA_DIR");
  return env && *env ? std::string(env) : std::string(CURLORA_SOURCE_ROOT "/../shared/data");
}

inline std::string golden_dir() { return CURLORA_SOURCE_ROOT "/tests/goldens"; }
