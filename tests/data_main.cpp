// Entry point for tests that read ../shared/data: they skip (exit code 77,
// which Meson reports as SKIP) with a message when the data folder is absent.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "tests/test_data.h"

#include <cstdio>
#include <filesystem>

int main(int argc, char** argv) {
  std::string dir = test_data_dir();
  if (!std::filesystem::is_directory(dir)) {
    std::fprintf(stderr, "SKIP: data folder '%s' not found; set CURLORA_DATA_DIR to ../shared/data\n", dir.c_str());
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
