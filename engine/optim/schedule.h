// Learning-rate schedules as in Hugging Face transformers' optimization.py:
// a multiplier of the base lr for each optimiser step. With w warmup steps
// and T total steps, for step s (the number of updates already taken):
//   warmup (s < w):           s / max(1, w)
//   Constant:                 1                       (no warmup at all)
//   ConstantWithWarmup:       1
//   Linear:                   max(0, (T - s) / max(1, T - w))
//   Cosine:                   max(0, 0.5 (1 + cos(pi * 2 cycles * p))), p = (s - w) / max(1, T - w)
// As with HF's LambdaLR, step 0 (the first update) already uses the
// multiplier, so a warmup starts at lr 0. Usage, before each update:
//   optimizer.set_lr(base_lr * schedule.multiplier(optimizer.step_count()));
#pragma once

#include <cstdint>
#include <string>

namespace engine::optim {

enum class ScheduleKind { Constant, ConstantWithWarmup, Linear, Cosine };

struct Schedule {
  ScheduleKind kind = ScheduleKind::Constant;
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;  // Linear and Cosine only
  double num_cycles = 0.5;  // Cosine only: 0.5 is a half wave, from 1 down to 0

  double multiplier(int64_t step) const;

  // Checked constructors, named after HF's get_*_schedule_with_warmup.
  static Schedule constant();
  static Schedule constant_with_warmup(int64_t warmup_steps);
  static Schedule linear(int64_t warmup_steps, int64_t total_steps);
  static Schedule cosine(int64_t warmup_steps, int64_t total_steps, double num_cycles = 0.5);
  // By HF's name ("constant", "constant_with_warmup", "linear", "cosine"), for the CLI.
  static Schedule from_name(const std::string& name, int64_t warmup_steps, int64_t total_steps);
};

}  // namespace engine::optim
