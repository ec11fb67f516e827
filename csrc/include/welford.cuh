// Mean / M2 statistics and Chan's merge (Chan, Golub, LeVeque 1979).
//
// Per thread, values are accumulated as shifted sums about the thread's first value
// (d = x - shift; s1 = sum d, s2 = sum d^2): the shift is a sample of the data, so |mean - shift|
// is O(std) and s2 - s1^2/n does not cancel catastrophically even when |mean| >> std, without
// Welford's per-element division. Threads, warps and blocks then combine (count, mean, M2) with
// Chan's formula, whose M2 is a sum of non-negative terms. Merges run in a fixed order (a
// shuffle-down tree, then warps / blocks / cluster ranks in index order), so results are bitwise
// repeatable. Chan's merge is not commutative bit for bit, hence trees that end in one lane and a
// broadcast rather than xor butterflies.
#pragma once

namespace fastnorm {

struct MeanM2 {
  float n;     // element count (exact in fp32 up to 2^24 per partial, and summed as float)
  float mean;
  float m2;    // sum of squared deviations from mean
};

__device__ __forceinline__ MeanM2 chan_merge(const MeanM2& a, const MeanM2& b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n;
  const float delta = b.mean - a.mean;
  const float frac_b = b.n / n;
  MeanM2 out;
  out.n = n;
  out.mean = a.mean + delta * frac_b;
  out.m2 = a.m2 + b.m2 + delta * delta * a.n * frac_b;
  return out;
}

// Shifted sums of one thread, turned into (n, mean, M2) once at the end.
struct ShiftedSums {
  float shift = 0.f;
  float s1 = 0.f;
  float s2 = 0.f;
  float n = 0.f;

  __device__ __forceinline__ void add(float x) {
    if (n == 0.f) shift = x;
    const float d = x - shift;
    s1 += d;
    s2 += d * d;
    n += 1.f;
  }
  __device__ __forceinline__ MeanM2 finish() const {
    MeanM2 r;
    r.n = n;
    if (n == 0.f) {
      r.mean = 0.f;
      r.m2 = 0.f;
    } else {
      const float dm = s1 / n;
      r.mean = shift + dm;
      r.m2 = fmaxf(s2 - s1 * dm, 0.f);
    }
    return r;
  }
};

}  // namespace fastnorm
