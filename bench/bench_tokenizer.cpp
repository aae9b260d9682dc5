// Tokenizer throughput on WikiText-2 test (1.29 MB): encode with a cold merge
// cache (a fresh tokenizer) beside a warm one, line by line, from several
// threads, and decode. Prints one JSON object.
// Usage: bench_tokenizer [DATA_DIR]   (default $CURLORA_DATA_DIR, else ../shared/data)
#include "data/gpt2_tokenizer.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

template <typename F>
double best_seconds(int repeats, F&& body) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    auto start = std::chrono::steady_clock::now();
    body();
    best = std::min(best, seconds_since(start));
  }
  return best;
}

std::vector<std::string> split_lines(const std::string& text) {
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    end = end == std::string::npos ? text.size() : end + 1;
    lines.push_back(text.substr(pos, end - pos));
    pos = end;
  }
  return lines;
}

}  // namespace

int main(int argc, char** argv) {
  const char* env = std::getenv("CURLORA_DATA_DIR");
  std::string data_dir = argc > 1 ? argv[1] : (env && *env ? env : "../shared/data");
  try {
    std::string path = data_dir + "/wikitext-2-raw/wiki.test.raw";
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "cannot open %s\n", path.c_str());
      return 1;
    }
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<std::string> lines = split_lines(text);
    const double mb = double(text.size()) / 1e6;

    auto load_start = std::chrono::steady_clock::now();
    auto tok = data::GPT2Tokenizer::from_dir(data_dir + "/gpt2-tokenizer");
    double load_s = seconds_since(load_start);

    std::vector<int32_t> ids;
    double cold_s = best_seconds(1, [&] { ids = tok.encode(text); });  // first pass: cache empty
    double warm_s = best_seconds(3, [&] { ids = tok.encode(text); });
    const double n_tokens = double(ids.size());

    double lines_s = best_seconds(3, [&] {
      std::vector<int32_t> line_ids;
      for (const auto& line : lines) {
        line_ids.clear();
        tok.encode_append(line, line_ids);
      }
    });

    // Cold cache on a fresh instance, the lines shared out among threads.
    unsigned n_threads = std::max(2u, std::thread::hardware_concurrency());
    auto fresh = data::GPT2Tokenizer::from_dir(data_dir + "/gpt2-tokenizer");
    double threads_s = best_seconds(1, [&] {
      std::vector<std::thread> workers;
      for (unsigned t = 0; t < n_threads; ++t)
        workers.emplace_back([&, t] {
          std::vector<int32_t> line_ids;
          for (size_t i = t; i < lines.size(); i += n_threads) {
            line_ids.clear();
            fresh.encode_append(lines[i], line_ids);
          }
        });
      for (auto& w : workers) w.join();
    });

    std::string decoded;
    double decode_s = best_seconds(3, [&] { decoded = tok.decode(ids); });
    if (decoded != text) {
      std::fprintf(stderr, "round trip failed\n");
      return 1;
    }

    fmt::print(
        "{{\"bench\": \"gpt2_tokenizer\", \"file\": \"{}\", \"bytes\": {}, \"tokens\": {}, \"load_s\": {:.3f},\n"
        " \"encode_cold\": {{\"MB_per_s\": {:.2f}, \"tokens_per_s\": {:.0f}}},\n"
        " \"encode_warm\": {{\"MB_per_s\": {:.2f}, \"tokens_per_s\": {:.0f}}},\n"
        " \"encode_lines_warm\": {{\"MB_per_s\": {:.2f}, \"lines\": {}}},\n"
        " \"encode_lines_cold_threads\": {{\"MB_per_s\": {:.2f}, \"threads\": {}}},\n"
        " \"decode\": {{\"MB_per_s\": {:.2f}, \"tokens_per_s\": {:.0f}}},\n"
        " \"warm_over_cold\": {:.2f}}}\n",
        path, text.size(), ids.size(), load_s, mb / cold_s, n_tokens / cold_s, mb / warm_s, n_tokens / warm_s,
        mb / lines_s, lines.size(), mb / threads_s, n_threads, mb / decode_s, n_tokens / decode_s, cold_s / warm_s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
