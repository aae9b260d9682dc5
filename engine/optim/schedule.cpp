// The schedules' formulas, transcribed from HF transformers' optimization.py
// (the lambdas of get_{constant,linear,cosine}_schedule_with_warmup).
#include "engine/optim/schedule.h"

#include "engine/error.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace engine::optim {

double Schedule::multiplier(int64_t step) const {
  check(step >= 0, "Schedule: step must be >= 0, got {}", step);
  const double s = double(step), w = double(warmup_steps), total = double(total_steps);
  if (kind == ScheduleKind::Constant) return 1.0;
  if (step < warmup_steps) return s / std::max(1.0, w);
  switch (kind) {
    case ScheduleKind::Constant:
    case ScheduleKind::ConstantWithWarmup: return 1.0;
    case ScheduleKind::Linear: return std::max(0.0, (total - s) / std::max(1.0, total - w));
    case ScheduleKind::Cosine: {
      const double progress = (s - w) / std::max(1.0, total - w);
      return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * num_cycles * 2.0 * progress)));
    }
  }
  return 1.0;
}

namespace {

void check_steps(const char* name, int64_t warmup_steps, int64_t total_steps) {
  check(warmup_steps >= 0 && total_steps >= 0, "{} schedule: steps must be >= 0, got warmup {} and total {}", name,
        warmup_steps, total_steps);
}

}  // namespace

Schedule Schedule::constant() { return Schedule{}; }

Schedule Schedule::constant_with_warmup(int64_t warmup_steps) {
  check_steps("constant_with_warmup", warmup_steps, 0);
  return Schedule{ScheduleKind::ConstantWithWarmup, warmup_steps, 0, 0.5};
}

Schedule Schedule::linear(int64_t warmup_steps, int64_t total_steps) {
  check_steps("linear", warmup_steps, total_steps);
  return Schedule{ScheduleKind::Linear, warmup_steps, total_steps, 0.5};
}

Schedule Schedule::cosine(int64_t warmup_steps, int64_t total_steps, double num_cycles) {
  check_steps("cosine", warmup_steps, total_steps);
  check(std::isfinite(num_cycles), "cosine schedule: num_cycles must be finite, got {}", num_cycles);
  return Schedule{ScheduleKind::Cosine, warmup_steps, total_steps, num_cycles};
}

Schedule Schedule::from_name(const std::string& name, int64_t warmup_steps, int64_t total_steps) {
  if (name == "constant") return constant();
  if (name == "constant_with_warmup") return constant_with_warmup(warmup_steps);
  if (name == "linear") return linear(warmup_steps, total_steps);
  if (name == "cosine") return cosine(warmup_steps, total_steps);
  fail("unknown schedule '{}': expected constant, constant_with_warmup, linear or cosine", name);
}

}  // namespace engine::optim
