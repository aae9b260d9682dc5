// A one-line progress bar on stderr with rate and ETA, drawn only when stderr
// is a terminal (logs and CI stay clean). The CLI owns it; the library only
// reports progress through callbacks.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include <unistd.h>

namespace cli {

class Progress {
 public:
  Progress(std::string label, std::string unit) : label_(std::move(label)), unit_(std::move(unit)) {
    enabled_ = isatty(fileno(stderr));
    start_ = std::chrono::steady_clock::now();
  }
  ~Progress() { finish(); }

  void update(int64_t done, int64_t total) {
    if (!enabled_ || total <= 0) return;
    auto now = std::chrono::steady_clock::now();
    if (done < total && now - last_draw_ < std::chrono::milliseconds(100)) return;  // at most 10 redraws/s
    last_draw_ = now;
    double seconds = std::chrono::duration<double>(now - start_).count();
    double rate = seconds > 0 ? double(done) / seconds : 0;
    double eta = rate > 0 ? double(total - done) / rate : 0;
    constexpr int kWidth = 30;
    int filled = int(kWidth * double(done) / double(total));
    std::fprintf(stderr, "\r%s [%s%s] %3d%% %.1f %s/s ETA %d:%02d ", label_.c_str(), std::string(size_t(filled), '#').c_str(),
                 std::string(size_t(kWidth - filled), ' ').c_str(), int(100 * done / total), rate, unit_.c_str(),
                 int(eta) / 60, int(eta) % 60);
    drawn_ = true;
  }

  void finish() {
    if (drawn_) std::fputc('\n', stderr);
    drawn_ = false;
  }

 private:
  std::string label_, unit_;
  bool enabled_ = false, drawn_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace cli
